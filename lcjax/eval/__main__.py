"""lcjax-eval / python -m lcjax.eval --gin_file=F [--gin_bindings=...] --workdir=DIR [--step=N]
    [--verbose]

Restores the newest (or the named) checkpoint of DIR and writes DIR/eval/results.json; creates
nothing else, and nothing at all when DIR or the checkpoint is missing. Exit status: 0 done,
1 the evaluation failed, 2 the command or its configuration must change (see lcjax/cli.py).
"""

import json
import os

from absl import flags, logging

from lcjax.cli import run_cli
from lcjax.errors import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "gin files, applied in order (later ones win).")
flags.DEFINE_multi_string("gin_bindings", [], "gin bindings, applied after the files.")
flags.DEFINE_string("workdir", None, "The training run's directory.")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest).")
flags.mark_flag_as_required("workdir")


def evaluate_checkpoint(workdir: str, step: int | None = None) -> dict:
  import gin
  import jax

  from lcjax.eval.evaluate import evaluate
  from lcjax.run import Run, build, load_eval_batches
  from lcjax.train.checkpoint import Checkpointer
  from lcjax.workdir import existing_workdir

  run = Run.from_gin()  # the bindings first, as lcjax.train checks them
  existing_workdir(workdir)
  setup = build(run)
  ckpt = Checkpointer(workdir, every=1, keep=run.train.keep_checkpoints, create=False)
  steps = ckpt.all_steps()
  step = ckpt.latest_step() if step is None else step
  if step is None or step not in steps:
    ckpt.close()
    fix = ("Choose --step from those, or leave it out for the newest." if steps
           else f"Train first with `python -m lcjax.train ... --workdir={workdir}`.")
    raise ConfigError(
        f"No checkpoint {'at step ' + str(step) + ' ' if step is not None else ''}in "
        f"{ckpt.directory} (available steps: {steps}); nothing was changed. {fix}")
  state, _ = ckpt.restore(step, setup.abstract_state(), gin.operative_config_str())
  ckpt.close()
  metrics = evaluate(setup.eval_step, state["params"], load_eval_batches(run))
  results = {"step": step, "checkpoint": os.path.join(ckpt.directory, str(step)), **metrics}
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    with open(os.path.join(workdir, "eval", "results.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results


def main(argv):
  del argv
  # gin knows a configurable only once its module is imported: these import every one a run's
  # gin files may bind (lcjax.run imports the model, data, mesh and optimizer configs).
  import lcjax.models.allocation  # noqa: F401  (hybrid_pattern)
  import lcjax.run  # noqa: F401
  from lcjax.config import parse_gin
  from lcjax.train.distributed import maybe_initialize

  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  parse_gin(FLAGS.gin_file, FLAGS.gin_bindings)
  maybe_initialize()
  results = evaluate_checkpoint(FLAGS.workdir, FLAGS.step)
  print("\n== lcjax eval ==")
  print(json.dumps(results, indent=1))
  print(f"written to {os.path.join(os.path.abspath(FLAGS.workdir), 'eval', 'results.json')}")


def run():
  run_cli(main)


if __name__ == "__main__":
  run()
