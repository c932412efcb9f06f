"""Starting a run from another run's checkpoint: TrainConfig.init_from = "DIR[:STEP]".

DIR is the other run's workdir or its checkpoints/ directory; STEP defaults to the newest.
TrainConfig.init_mode "params" takes its parameters (the optimizer starts fresh);
"params_and_optimizer" takes the optimizer state too (AdamW's moments), with the learning-rate
schedule restarted. Either way the new run's step counter starts at 0 and follows its own
schedule, stages and data. Anything the parameters do not depend on (RoPE, sequence length,
data, schedule) may differ from the other run: that is what it is for (context extension).
"""

import jax
import optax

from lcjax import paths
from lcjax.errors import ConfigError
from lcjax.train.checkpoint import Checkpointer
from lcjax.train.shapes import array_differences
from lcjax.workdir import CHECKPOINTS


def parse(spec: str) -> tuple[str, int | None]:
  """"DIR[:STEP]" -> (DIR, STEP or None)."""
  head, sep, tail = spec.rpartition(":")
  return (head, int(tail)) if sep and tail.isdigit() else (spec, None)


def initial_state(train_cfg, setup, fresh: dict, config: str) -> dict:
  """The state a run initialised from `train_cfg.init_from` starts with: `fresh` (a new run's
  state, placed on the mesh) with the other checkpoint's parameters (and optimizer state).
  `config` is this run's operative gin text. ConfigError (cause and fix) when the checkpoint
  is missing or does not fit."""
  spec, mode = train_cfg.init_from, train_cfg.init_mode
  step = parse(spec)[1]
  ckpt = Checkpointer(source_workdir(spec), every=1, keep=1, create=False)
  try:
    steps = ckpt.all_steps()
    step = steps[-1] if step is None and steps else step
    if step not in steps:
      raise ConfigError(
          f"TrainConfig.init_from = {spec!r}: no checkpoint {'' if step is None else step} in "
          f"{ckpt.directory} (its steps: {steps}). Name one of those steps (DIR:STEP), or "
          "train that run first.")
    items = ("params", "opt_state") if mode == "params_and_optimizer" else ("params",)
    abstract = {k: setup.abstract_state()[k] for k in items}
    where = f"TrainConfig.init_from = {spec!r} (step {step} in {ckpt.directory})"
    restored = ckpt.restore_part(step, abstract, lambda saved: _check(saved, abstract, where))
  finally:
    ckpt.close()
  state = {**fresh, **restored}
  if "opt_state" in restored:
    state["opt_state"] = _restart_schedule(restored["opt_state"], fresh["opt_state"])
  print(f"Initialised from {ckpt.directory}/{step} ({mode}); training starts at step 0.")
  return state


def source_workdir(spec: str) -> str:
  """The workdir (local or remote) that `spec` ("DIR[:STEP]") names, by it or by its
  checkpoints/ directory; a ConfigError when it holds no checkpoints/."""
  root = paths.resolve(parse(spec)[0])
  if root.name == CHECKPOINTS and root.is_dir():
    return str(root.parent)
  if (root / CHECKPOINTS).is_dir():
    return str(root)
  what = "does not exist" if not root.exists() else f"holds no {CHECKPOINTS}/ directory"
  raise ConfigError(
      f"TrainConfig.init_from = {spec!r}: {root} {what}. Give the workdir (or its "
      f"{CHECKPOINTS}/ directory) of a run that has saved a checkpoint, as DIR or DIR:STEP.")


def _check(saved, abstract: dict, where: str) -> None:
  """ConfigError naming the parameters (or optimizer state) that do not fit this run."""
  for item, what, fix in [
      ("params", "parameters",
       "init_from needs the same parameter shapes (only what they do not depend on, such as "
       "RoPE, sequence length, data or schedule, may change): set the model's bindings back "
       "to that run's, or leave TrainConfig.init_from unset"),
      ("opt_state", "optimizer state",
       "set TrainConfig.init_mode = 'params' to start the optimizer fresh, or configure the "
       "optimizer as that run did")]:
    if item not in abstract:
      continue
    differences = array_differences({item: saved.get(item, {})}, {item: abstract[item]},
                                    "that checkpoint", "this run", "there -> here")
    if differences:
      raise ConfigError(f"{where}: this run's {what} cannot take that checkpoint's: "
                        f"{'. '.join(differences)}. Fix: {fix}.")


def _restart_schedule(restored, fresh):
  """`restored` optimizer state with the schedule's step count of `fresh` (0): the new run
  follows its own learning-rate schedule from its start. AdamW's own count stays with its
  moments (its bias correction assumes the moments' age)."""
  def is_schedule(x):
    return isinstance(x, optax.ScaleByScheduleState)
  return jax.tree.map(lambda r, f: f if is_schedule(r) else r, restored, fresh,
                      is_leaf=is_schedule)
