"""lcjax-eval / python -m lcjax.eval --gin_file=F [--gin_bindings=...] --workdir=DIR [--step=N]
    [--suite=niah_grid,ppl_by_position] [--compare=OTHER_RESULTS_DIR ...] [--verbose]

Restores the newest (or the named) checkpoint of DIR (when DIR has none, of the run that
TrainConfig.init_from names: a run not yet trained is its starting point), scores the eval
tasks teacher-forced (what the training loop logs) and runs the probes of the suite
(`lcjax.eval.suite`; default `EvalConfig.suite`), then writes DIR/eval/<step>/: results.json,
one CSV and PNG per probe and report.md (`lcjax.eval.report`). --compare draws another run's results (its eval/<step>
directory or results.json) on the same plots. Creates nothing when DIR or the checkpoint is
missing. Exit status: 0 done, 1 the evaluation failed, 2 the command or its configuration must
change (see lcjax/cli.py).
"""

import json

from absl import flags, logging

from lcjax.cli import run_cli
from lcjax.errors import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "gin files, applied in order (later ones win).")
flags.DEFINE_multi_string("gin_bindings", [], "gin bindings, applied after the files.")
flags.DEFINE_string("workdir", None, "The training run's directory (local, or gs://bucket/...).")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest).")
flags.DEFINE_list("suite", None, "Probes to run (default: EvalConfig.suite); '' for none.")
flags.DEFINE_multi_string("compare", [], "Another run's eval results to plot alongside.")
flags.mark_flag_as_required("workdir")


def restore_params(workdir: str, setup, step: int | None, keep: int):
  """(params, step, checkpoint path) of the newest or the named checkpoint (a trained run's or
  an imported one's); a ConfigError naming the steps there when it is missing."""
  import gin

  from lcjax.train.checkpoint import Checkpointer

  ckpt = Checkpointer(workdir, every=1, keep=keep, create=False)
  try:
    steps = ckpt.all_steps()
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in steps:
      fix = ("Choose --step from those, or leave it out for the newest." if steps
             else f"Train first with `python -m lcjax.train ... --workdir={workdir}`.")
      raise ConfigError(
          f"No checkpoint {'at step ' + str(step) + ' ' if step is not None else ''}in "
          f"{ckpt.directory} (available steps: {steps}); nothing was changed. {fix}")
    # Only the params: a checkpoint imported by lcjax.convert holds nothing else.
    abstract = {"params": setup.abstract_state()["params"]}
    config = gin.operative_config_str()

    def check(saved):  # a mismatch names the parameters and the gin bindings that changed
      ckpt.check_fits(step, {"params": saved.get("params", {})}, abstract, config)

    params = ckpt.restore_part(step, abstract, check)["params"]
    return params, step, f"{ckpt.directory}/{step}"
  finally:
    ckpt.close()


def checkpoint_source(workdir: str, init_from: str | None,
                      step: int | None) -> tuple[str, int | None]:
  """(the run directory whose checkpoint is evaluated, its step or None for the newest):
  `workdir` itself, or, when it is a directory with no checkpoints/ and TrainConfig.init_from
  is set, the run that init_from names (as lcjax.train would start from it)."""
  from lcjax import paths
  from lcjax.train import init_from as init_from_lib
  from lcjax.workdir import CHECKPOINTS

  root = paths.resolve(workdir)
  if init_from is None or not root.is_dir() or (root / CHECKPOINTS).is_dir():
    return workdir, step
  source = init_from_lib.source_workdir(init_from)
  print(f"{workdir} has no checkpoint of its own: evaluating TrainConfig.init_from = "
        f"{init_from!r}, writing into {workdir}.")
  return source, init_from_lib.parse(init_from)[1] if step is None else step


def evaluate_checkpoint(workdir: str, step: int | None = None, suite=None,
                        compare=()) -> dict:
  """Evaluates one checkpoint of `workdir` and writes DIR/eval/<step>/ (process 0);
  returns the results dict (`lcjax.eval.report` documents it)."""
  import jax

  from lcjax import paths
  from lcjax.data.pipeline import vocabulary
  from lcjax.eval import report
  from lcjax.eval.evaluate import evaluate
  from lcjax.eval.suite import EvalConfig, model_for, run_suite
  from lcjax.run import Run, build, load_eval_batches
  from lcjax.train import stages
  from lcjax.train.state import model_skeleton
  from lcjax.workdir import existing_workdir

  run, eval_cfg = Run.from_gin(), EvalConfig()  # the bindings first, as lcjax.train checks them
  others = [report.load_results(path) for path in compare]
  source, step = checkpoint_source(workdir, run.train.init_from, step)
  existing_workdir(source)
  setup = build(run)
  params, step, checkpoint = restore_params(source, setup, step, run.train.keep_checkpoints)
  if run.train.stages:  # evaluate with the stage that trained it: its length, its RoPE
    run = stages.run_at(run, step)
  if eval_cfg.attention:
    run = stages.with_attention(run, eval_cfg.attention, "EvalConfig.attention")
  if run.train.stages or eval_cfg.attention:
    setup = build(run)
  results = {"model": workdir, "step": step, "checkpoint": checkpoint,
             "train_length": run.data.sequence_length,
             **({"attention_overrides": eval_cfg.attention} if eval_cfg.attention else {}),
             "metrics": evaluate(setup.eval_step, params, load_eval_batches(run))}
  names = eval_cfg.suite if suite is None else tuple(suite)
  model = model_for(setup, run, params, model_skeleton(run.model.for_inference())[0],
                    vocabulary(run.data), eval_cfg.rows)
  results["probes"] = run_suite(model, names)
  if jax.process_index() == 0:
    out_dir = str(paths.resolve(workdir) / "eval" / str(step))
    results["written"] = report.write_all(out_dir, results, others)
  return results


def main(argv):
  del argv
  # gin knows a configurable only once its module is imported: these import every one a run's
  # gin files may bind (lcjax.run imports the model, data, mesh and optimizer configs).
  import lcjax.eval.suite  # noqa: F401  (EvalConfig and the probes)
  import lcjax.models.allocation  # noqa: F401  (hybrid_pattern)
  import lcjax.run  # noqa: F401
  from lcjax import paths
  from lcjax.config import parse_gin
  from lcjax.train.distributed import maybe_initialize

  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  parse_gin(FLAGS.gin_file, FLAGS.gin_bindings)
  maybe_initialize()
  suite = None if FLAGS.suite is None else [n for n in FLAGS.suite if n]
  results = evaluate_checkpoint(FLAGS.workdir, FLAGS.step, suite, FLAGS.compare)
  print("\n== lcjax eval ==")
  print(json.dumps(results["metrics"], indent=1))
  written = results.get("written", [])
  report_md = [p for p in written if p.endswith("report.md")]
  if report_md:
    report = paths.resolve(report_md[0])
    print(f"report: {report} ({len(written)} files in {report.parent})")


def run():
  run_cli(main)


if __name__ == "__main__":
  run()
