"""Context extension, end to end on CPU: a smoke test that the pieces compose.

A tiny RoPE Transformer is trained at length L, then fine-tuned briefly at 2L from that
checkpoint (TrainConfig.init_from) with each extension method, and every model is evaluated at
L and 4L: loss by position over held-out plays (teacher-forced) and the needle grid (generated).

    method     fine-tune at 2L with
    base       (no fine-tune: the model trained at L, as is)
    plain      unchanged RoPE
    pi         rope_scaling linear, factor 4 (position interpolation)
    yarn       rope_scaling yarn, factor 4, original 128
    theta      rope_theta 1e6 (ABF, Code Llama's base)

Usage:  python experiments/context_extension.py [--out runs/context_extension]
Prints a table (loss in nats over positions [0, L), [L, 2L), [2L, 4L) at 4L; needle score at L
and 4L) and
writes the last model's report with every model on its plots (lcjax.eval --compare).
Scale: at these sizes the numbers show whether the machinery works, not which method is best.
"""

import argparse
import json
import os
import subprocess
import sys

L = 128
METHODS = {
    "plain": [],
    "pi": ['AttentionConfig.rope_scaling = {"rope_type": "linear", "factor": 4.0}'],
    "yarn": ['AttentionConfig.rope_scaling = {"rope_type": "yarn", "factor": 4.0, '
             f'"original_max_position_embeddings": {L}}}'],
    "theta": ["AttentionConfig.rope_theta = 1e6"],
}
COMMON = [
    "MixtureRates.shakespeare = 0.7", "MixtureRates.passkey = 0.3",
    "MqarConfig.num_pairs = 8", "MqarConfig.num_queries = 4",  # (unused, but must fit L)
    "ModelConfig.embed_init_std = None",  # demo.gin's std 1 is for its untied hybrid
    "TrainConfig.eval_every = 100000", "TrainConfig.log_every = 50",
    "EvalConfig.suite = ('ppl_by_position', 'niah_grid')",
    f"PplByPosition.lengths = ({L}, {4 * L})", "PplByPosition.documents = 8",
    f"NiahGrid.lengths = ({L}, {4 * L})", "NiahGrid.samples = 2",
]
GIN = ["--gin_file=configs/demo.gin", "--gin_file=configs/models/transformer_tiny.gin"]


def lcjax(module: str, workdir: str, bindings: list[str], *extra: str) -> None:
  args = [sys.executable, "-m", module, *GIN, f"--workdir={workdir}", *extra]
  args += [f"--gin_bindings={b}" for b in bindings]
  subprocess.run(args, check=True)


def summarize(results: dict) -> dict:
  """Loss over [0, L), [L, 2L), [2L, 4L) at 4L (bucket means weighted by overlap), and the
  needle score at L and 4L."""
  rows = [r for r in results["probes"]["ppl_by_position"]["rows"] if r["length"] == 4 * L]

  def loss(lo, hi):  # buckets are log-spaced: weigh each by its overlap with [lo, hi)
    share = lambda r: max(0, min(hi, r["position_end"]) - max(lo, r["position_start"])) / (
        r["position_end"] - r["position_start"]) * r["tokens"]
    return sum(r["loss"] * share(r) for r in rows) / sum(share(r) for r in rows)

  niah = results["probes"]["niah_grid"]["rows"]
  score = lambda n: sum(r["score"] for r in niah if r["length"] == n) / max(
      1, sum(r["length"] == n for r in niah))
  return {"loss [0,L)": loss(0, L), "loss [L,2L)": loss(L, 2 * L),
          "loss [2L,4L)": loss(2 * L, 4 * L), "needle @L": score(L), "needle @4L": score(4 * L)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/context_extension")
  parser.add_argument("--base_steps", type=int, default=400)
  parser.add_argument("--tune_steps", type=int, default=100)
  args = parser.parse_args()
  base = os.path.join(args.out, "base")
  lcjax("lcjax.train", base, COMMON + [f"DataConfig.sequence_length = {L}",
                                      f"TrainConfig.steps = {args.base_steps}",
                                      f"TrainConfig.checkpoint_every = {args.base_steps}"])
  lcjax("lcjax.eval", base, COMMON + [f"DataConfig.sequence_length = {L}"])
  dirs = {"base": base}
  for name, rope in METHODS.items():
    dirs[name] = os.path.join(args.out, name)
    tune = COMMON + rope + [f"DataConfig.sequence_length = {2 * L}",
                            f"TrainConfig.steps = {args.tune_steps}",
                            f"TrainConfig.checkpoint_every = {args.tune_steps}",
                            f"TrainConfig.init_from = '{base}'",
                            "OptimConfig.warmup_steps = 10"]
    lcjax("lcjax.train", dirs[name], tune)
    last = name == list(METHODS)[-1]
    others = [f"--compare={_results_dir(d)}" for d in dirs.values() if d != dirs[name]]
    lcjax("lcjax.eval", dirs[name], tune, *(others if last else []))
  table = {name: summarize(json.load(open(os.path.join(_results_dir(d), "results.json"))))
           for name, d in dirs.items()}
  columns = list(next(iter(table.values())))
  print("\n| method | " + " | ".join(columns) + " |")
  print("|---|" + "---|" * len(columns))
  for name, row in table.items():
    print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
  print(f"\nreport with every model: {_results_dir(dirs[list(METHODS)[-1]])}/report.md")


def _results_dir(workdir: str) -> str:
  evals = os.path.join(workdir, "eval")
  return os.path.join(evals, max(os.listdir(evals), key=int))


if __name__ == "__main__":
  main()
