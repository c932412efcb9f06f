"""Attention and SSD kernels: every implementation the current backend runs, over lengths.

For each op, implementation and sequence length: the median time of a jitted forward+backward
(or forward only, --mode=fwd), the achieved TFLOP/s by the model-FLOP count below, and the
speed relative to the baseline (attention: "xla", XLA's fused attention, cuDNN on GPU; SSD:
"chunked", the XLA chunked algorithm): >1 means faster than the baseline. All implementations
of one length run in the same process, one after another, so the ratios share the machine's
state.

FLOPs (model count, not what a kernel executes): causal attention 4*b*h*d*s^2/2 forward;
SSD per token and head 2*N*(Q+1)/2 (C.B scores, per group) + 2*P*(Q+1)/2 (mixing x) + 4*P*N
(chunk states and the incoming state's output). Backward is counted as 2.5x (attention, the
FlashAttention-2 convention: recomputation included) and 2x (SSD) the forward.

On CPU the Pallas kernels only run in interpret mode (a correctness tool, see
tests/kernels): they are listed as skipped, not timed.

    python bench/kernels.py [--seq_lens=1024,2048,4096] [--mode=fwd+bwd|fwd] [--dtype=...]
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lcjax.kernels import attention as attention_kernels  # noqa: E402
from lcjax.kernels import ssd as ssd_kernels  # noqa: E402
from lcjax.kernels.mask import Mask, row_tokens  # noqa: E402

ON_ACCELERATOR = jax.default_backend() in ("gpu", "tpu")
# Shapes of one layer: a ~1B-class model on accelerators, a small one on CPU.
ATTN = dict(batch=1, heads=16, kv_heads=8, head_dim=128) if ON_ACCELERATOR else dict(
    batch=1, heads=4, kv_heads=2, head_dim=64)
SSD = dict(batch=1, heads=32, head_dim=64, groups=1, d_state=128, chunk=256) if (
    ON_ACCELERATOR) else dict(batch=1, heads=8, head_dim=64, groups=1, d_state=64, chunk=128)


def attention_flops(seq: int, mode: str) -> float:
  fwd = 4 * ATTN["batch"] * ATTN["heads"] * ATTN["head_dim"] * seq * seq / 2
  return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def ssd_flops(seq: int, mode: str) -> float:
  s = SSD
  keys = (min(s["chunk"], seq) + 1) / 2
  per_token = (2 * s["groups"] * s["d_state"] * keys
               + s["heads"] * (2 * s["head_dim"] * keys + 4 * s["head_dim"] * s["d_state"]))
  return s["batch"] * seq * per_token * (3.0 if mode == "fwd+bwd" else 1.0)


def attention_case(impl: str, seq: int, dtype, mode: str, rng):
  a = ATTN
  q = jnp.asarray(rng.standard_normal((a["batch"], seq, a["heads"], a["head_dim"])), dtype)
  k = jnp.asarray(rng.standard_normal((a["batch"], seq, a["kv_heads"], a["head_dim"])), dtype)
  v = jnp.asarray(rng.standard_normal(k.shape), dtype)
  segment_ids = jnp.ones((a["batch"], seq), jnp.int32)
  fn = attention_kernels.IMPLS[impl]
  tokens = row_tokens(segment_ids)

  def forward(q, k, v):
    return fn(q, k, v, tokens, tokens, mask=Mask())[0]

  return _timed_fn(forward, (q, k, v), mode)


def ssd_case(impl: str, seq: int, dtype, mode: str, rng):
  s = SSD
  x = jnp.asarray(rng.standard_normal((s["batch"], seq, s["heads"], s["head_dim"])), dtype)
  dt = jnp.asarray(np.log1p(np.exp(rng.standard_normal((s["batch"], seq, s["heads"])) - 4)),
                   jnp.float32)
  A = -jnp.asarray(rng.uniform(1, 16, s["heads"]), jnp.float32)
  B = jnp.asarray(rng.standard_normal((s["batch"], seq, s["groups"], s["d_state"])), dtype)
  C = jnp.asarray(rng.standard_normal(B.shape), dtype)

  def forward(x, dt, B, C):
    return ssd_kernels.ssd(x, dt, A, B, C, chunk_size=s["chunk"], impl=impl)[0]

  return _timed_fn(forward, (x, dt, B, C), mode)


def _timed_fn(forward, args, mode: str):
  if mode == "fwd":
    return jax.jit(forward), args
  cotangent = jnp.ones(jax.eval_shape(forward, *args).shape, args[0].dtype)

  def forward_backward(*args):
    out, vjp = jax.vjp(forward, *args)
    return out, vjp(cotangent)

  return jax.jit(forward_backward), args


def median_seconds(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run_op(name, impls, baseline, case, count_flops, seq_lens, dtype, mode, repeats):
  print(f"\n### {name} ({mode}, {jnp.dtype(dtype).name}, "
        f"{ATTN if name == 'attention' else SSD})\n")
  print("| seq | impl | time (ms) | TFLOP/s | speed vs " + baseline + " |")
  print("|---:|---|---:|---:|---:|")
  rng = np.random.default_rng(0)
  for seq in seq_lens:
    times = {}
    for impl in impls:
      if impl == "pallas" and not ON_ACCELERATOR:
        times[impl] = "skipped (interpret mode only on CPU)"
        continue
      try:
        times[impl] = median_seconds(*case(impl, seq, dtype, mode, rng), repeats)
      except Exception as e:  # out of memory or an unsupported shape: report, go on
        times[impl] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    base = times.get(baseline)
    for impl, t in times.items():
      if isinstance(t, str):
        print(f"| {seq} | {impl} | {t} | | |")
        continue
      ratio = f"{base / t:.2f}x" if isinstance(base, float) else "n/a"
      print(f"| {seq} | {impl} | {t * 1e3:.2f} | {count_flops(seq, mode) / t / 1e12:.3f} | "
            f"{ratio} |")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  default_lens = "1024,2048,4096,8192,16384,32768,65536" if ON_ACCELERATOR else "1024,2048,4096"
  p.add_argument("--seq_lens", default=default_lens)
  p.add_argument("--mode", default="fwd+bwd", choices=("fwd+bwd", "fwd"))
  p.add_argument("--dtype", default="bfloat16" if ON_ACCELERATOR else "float32")
  p.add_argument("--ops", default="attention,ssd")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  seq_lens = [int(s) for s in args.seq_lens.split(",")]
  dtype = jnp.dtype(args.dtype)
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  ops = args.ops.split(",")
  if "attention" in ops:
    run_op("attention", sorted(attention_kernels.IMPLS), "xla", attention_case,
           attention_flops, seq_lens, dtype, args.mode, args.repeats)
  if "ssd" in ops:
    # The sequential scan is O(seq) steps: only at the shortest length.
    run_op("ssd", ["chunked", "pallas"], "chunked", ssd_case, ssd_flops, seq_lens, dtype,
           args.mode, args.repeats)
    run_op("ssd", ["reference", "chunked"], "chunked", ssd_case, ssd_flops, seq_lens[:1],
           dtype, args.mode, args.repeats)


if __name__ == "__main__":
  main()
