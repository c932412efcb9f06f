"""lcjax-train / python -m lcjax.train --gin_file=F [--gin_file=F2] [--gin_bindings=...]
    --workdir=DIR [--verbose]

Exit status: 0 done or preempted (run it again to resume), 1 the run failed, 2 the command or
its configuration must change (see lcjax/cli.py).
"""

import json

from absl import flags, logging

from lcjax.cli import run_cli

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "gin files, applied in order (later ones win).")
flags.DEFINE_multi_string("gin_bindings", [], "gin bindings, applied after the files.")
flags.DEFINE_string("workdir", None, "Run directory (local, or gs://bucket/...): config, "
                    "checkpoints, metrics, TensorBoard.")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  # gin knows a configurable only once its module is imported: these import every one a run's
  # gin files may bind (lcjax.run imports the model, data, mesh and optimizer configs).
  import lcjax.models.allocation  # noqa: F401  (hybrid_pattern)
  from lcjax.config import parse_gin
  from lcjax.run import Run
  from lcjax.train.distributed import maybe_initialize
  from lcjax.train.loop import train
  from lcjax.workdir import prepare_workdir

  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  parse_gin(FLAGS.gin_file, FLAGS.gin_bindings)
  # Every binding's type and range, then the path, in a second and before anything is created
  # (neither touches a JAX backend, which maybe_initialize must come before).
  run = Run.from_gin()
  prepare_workdir(FLAGS.workdir)
  maybe_initialize()
  print_summary(train(FLAGS.workdir, run))


def print_summary(summary: dict) -> None:
  print("\n== lcjax train summary ==")
  if summary["preempted"]:
    print(f"preempted at step {summary['step']}; run the same command again to resume")
  if summary["train"]:
    from lcjax.train.metrics import read_metrics
    t = summary["train"]
    first = next(r for r in read_metrics(summary["workdir"]) if r.get("loss") is not None)
    print(f"step {t['step']}: loss {t['loss']:.4f} (step {first['step']}: {first['loss']:.4f})  "
          f"grad_norm {t['grad_norm']:.3f}  tokens/s {t['tokens_per_sec']:.0f}")
  else:
    print(f"nothing to do: already at step {summary['step']}")
  if summary["eval"]:
    print("eval: " + json.dumps({k: round(v, 4) for k, v in summary["eval"].items()}, indent=1))
  for key in ("checkpoints", "tensorboard", "metrics"):
    print(f"{key:12s} {summary[key]}")


def run():
  run_cli(main)


if __name__ == "__main__":
  run()
