"""Cost of one train step vs sequence length, at a fixed number of tokens per batch.

For each sequence length: XLA's compiled FLOPs (`cost_analysis`) and memory
(`memory_analysis`, deterministic on CPU), our model-FLOPs count (the MFU numerator), and the
measured step time. Prints a markdown table (recorded in bench/README.md).

    python bench/step_cost.py [--gin_file=configs/demo.gin] [--tokens=16384]
        [--seq_lens=1024,2048,4096,8192,16384] [--time_up_to=4096] [--steps=3]
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lcjax.config import parse_gin  # noqa: E402
from lcjax.train import flops  # noqa: E402
from lcjax.train import state as train_state  # noqa: E402
from lcjax.run import Run, build  # noqa: E402
from lcjax.train.step import make_train_step  # noqa: E402


def first(x):
  return x[0] if isinstance(x, list) else x


def measure(run: Run, seq_len: int, batch: int, time_it: bool, steps: int) -> dict:
  run = dataclasses.replace(
      run,
      data=dataclasses.replace(run.data, sequence_length=seq_len),
      train=dataclasses.replace(run.train, batch_size=batch, grad_accum_steps=1))
  b = build(run)
  step_fn = jax.jit(make_train_step(b.graphdef, b.optimizer, b.schedule, 1),
                    in_shardings=(b.shardings, b.batch_sharding), donate_argnums=0)
  abstract = train_state.abstract_state(b.abstract_params, b.optimizer)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  abstract_batch = {k: tokens for k in ("inputs", "targets", "segment_ids", "positions")}
  abstract_batch["loss_weights"] = jax.ShapeDtypeStruct((batch, seq_len), jnp.float32)
  compiled = step_fn.lower(abstract, abstract_batch).compile()
  cost = first(compiled.cost_analysis())
  mem = compiled.memory_analysis()
  row = {
      "seq_len": seq_len, "batch": batch,
      "xla_gflop": cost["flops"] / 1e9,
      "model_gflop": flops.train_flops_per_token(run.model, seq_len) * batch * seq_len / 1e9,
      "temp_mib": mem.temp_size_in_bytes / 2**20,
      "peak_mib": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                   + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2**20,
      "step_s": None,
  }
  if time_it:
    state = train_state.init_state(run.model, 0, b.optimizer, b.shardings)
    rng = np.random.default_rng(0)
    data = {
        "inputs": rng.integers(3, 259, (batch, seq_len), dtype=np.int32),
        "targets": rng.integers(3, 259, (batch, seq_len), dtype=np.int32),
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
        "loss_weights": np.ones((batch, seq_len), np.float32),
    }
    data = b.put_batch(data, batch)
    state, m = compiled(state, data)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      state, m = compiled(state, data)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
    row["step_s"] = statistics.median(times)
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--gin_file", action="append", default=None)
  p.add_argument("--gin_bindings", action="append", default=[])
  p.add_argument("--tokens", type=int, default=16384, help="tokens per batch (batch x seq)")
  p.add_argument("--seq_lens", default="1024,2048,4096,8192,16384")
  p.add_argument("--time_up_to", type=int, default=4096,
                 help="time steps up to this length (longer ones are compiled only: the\n"
                      "reference attention of the demo model needs ~27 GiB at 8K)")
  p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
  args = p.parse_args()
  parse_gin(args.gin_file or ["configs/demo.gin"], args.gin_bindings)
  run = Run.from_gin()
  m, att = run.model, run.model.attention
  print(f"model: pattern={m.pattern} d_model={m.d_model} heads={att.num_heads}/"
        f"{att.num_kv_heads} dtype={m.dtype} remat={m.remat}; {args.tokens} tokens per batch; "
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; jax {jax.__version__}\n")
  print("| seq len | batch | XLA GFLOP/step | model GFLOP/step | XLA temp MiB | XLA peak MiB "
        "| step time s | tokens/s |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|")
  for seq_len in (int(s) for s in args.seq_lens.split(",")):
    if args.tokens % seq_len:
      raise SystemExit(f"--tokens={args.tokens} is not a multiple of seq len {seq_len}")
    r = measure(run, seq_len, args.tokens // seq_len, seq_len <= args.time_up_to, args.steps)
    step = f"{r['step_s']:.2f}" if r["step_s"] else "not run"
    tps = f"{args.tokens / r['step_s']:.0f}" if r["step_s"] else "-"
    print(f"| {seq_len} | {r['batch']} | {r['xla_gflop']:.1f} | {r['model_gflop']:.1f} "
          f"| {r['temp_mib']:.0f} | {r['peak_mib']:.0f} | {step} | {tps} |", flush=True)


if __name__ == "__main__":
  main()
