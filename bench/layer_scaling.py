"""Compiled memory and FLOPs of one Mamba-2 block vs one attention block, 1K to 64K tokens.

Forward + backward (gradients of the parameters and the input) of a single pre-norm block at
batch 1, compiled by XLA for the current backend; nothing is run, so every length fits.
Attention is the reference kernel (materialised scores); Mamba-2 is the chunked SSD.

    python bench/layer_scaling.py [--gin_file=configs/models/hybrid_125m.gin]
        [--seq_lens=1024,2048,4096,8192,16384,32768,65536]
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from lcjax.models.lm import Block  # noqa: E402
from lcjax.models.pattern import MIXERS  # noqa: E402
from lcjax.models.report import model_config  # noqa: E402


def compiled_cost(cfg, symbol: str, seq_len: int) -> tuple[float, float]:
  """(GFLOP, temp MiB) of grad of a block's summed output at [1, seq_len, d_model]."""
  block = nnx.eval_shape(lambda: Block(cfg, symbol, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(block)

  def loss(params, x, segment_ids, positions):
    out = nnx.merge(graphdef, params)(x, segment_ids=segment_ids, positions=positions)
    return jnp.sum(out.astype(jnp.float32))

  x = jax.ShapeDtypeStruct((1, seq_len, cfg.d_model), cfg.compute_dtype)
  ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, ids, ids).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["flops"] / 1e9, compiled.memory_analysis().temp_size_in_bytes / 2**20


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--gin_file", default="configs/models/hybrid_125m.gin")
  p.add_argument("--seq_lens", default="1024,2048,4096,8192,16384,32768,65536")
  args = p.parse_args()
  cfg = model_config(args.gin_file)
  att, mamba = cfg.attention, cfg.mamba
  print(f"{args.gin_file}: d_model {cfg.d_model}, attention {att.num_heads}x{att.head_dim} "
        f"(kv {att.num_kv_heads}), Mamba-2 expand {mamba.expand} d_state {mamba.d_state} "
        f"headdim {mamba.headdim} chunk {mamba.chunk_size}, {cfg.dtype}; "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}\n")
  print("| seq len | attention GFLOP | Mamba-2 GFLOP | attention temp MiB | Mamba-2 temp MiB "
        "| model GFLOP attn / M2 (fwd+bwd) |")
  print("|---:|---:|---:|---:|---:|---:|")
  for seq_len in (int(s) for s in args.seq_lens.split(",")):
    a_flops, a_mem = compiled_cost(cfg, "*", seq_len)
    m_flops, m_mem = compiled_cost(cfg, "M", seq_len)
    ours_a, ours_m = (3 * MIXERS[s].flops(cfg.mixer_config(s), cfg.d_model, seq_len)
                      * seq_len / 1e9 for s in "*M")
    print(f"| {seq_len} | {a_flops:.1f} | {m_flops:.1f} | {a_mem:.0f} | {m_mem:.0f} "
          f"| {ours_a:.1f} / {ours_m:.1f} |", flush=True)


if __name__ == "__main__":
  main()
