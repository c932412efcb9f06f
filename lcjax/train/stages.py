"""Staged training: one run that moves through a declared list of stages (ProLong, LWM and
"Effective Long-Context Scaling" extend the context this way), each with its own steps,
sequence length, batch, RoPE settings, learning-rate schedule and data mixture.

    TrainConfig.stages = [@short/Stage(), @long/Stage()]
    short/Stage.steps = 100
    long/Stage.steps = 50
    long/Stage.sequence_length = 4096
    long/Stage.attention = {"rope_theta": 1e6}

A stage's None fields inherit the run's base config. Each stage trains under its own `Run`
(`stage_run`): a new jitted step, data iterator and eval, while parameters and optimizer state
carry over unchanged. A stage may change only what the parameters do not depend on; the
learning rate is one schedule over the whole run (`learning_rate`), joined from every stage's
warmup + cosine, so the optimizer state keeps its structure.
"""

import dataclasses
import json

import gin
import numpy as np
import optax

from lcjax.config import check_types
from lcjax.errors import ConfigError
from lcjax.train import optim

# Stage fields that shape the learning-rate schedule: OptimConfig fields of the same name.
_SCHEDULE_FIELDS = ("peak_learning_rate", "warmup_steps", "final_learning_rate_fraction")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage; None inherits the run's base config (DataConfig, TrainConfig, OptimConfig).

  batch_size: rows per step; batch_tokens: tokens per step instead (rows = batch_tokens /
    sequence_length, which must divide it), e.g. to keep the tokens per step constant while
    the length grows.
  peak_learning_rate / warmup_steps / final_learning_rate_fraction: this stage's piece of the
    schedule (warmup from 0, cosine to peak * fraction at its last step).
  attention / model / data: AttentionConfig / ModelConfig / DataConfig field overrides
    (`{"rope_theta": 1e6}`, `{"remat": "full"}`, `{"eval_tasks": ("lcjax_shakespeare",)}`),
    any field but those the parameters' shapes depend on.
  The stage's name is its gin scope (`long` in `@long/Stage()`), used in logs and errors.
  """
  steps: int = 0
  sequence_length: int | None = None
  batch_size: int | None = None
  batch_tokens: int | None = None
  train_mixture: str | None = None
  peak_learning_rate: float | None = None
  warmup_steps: int | None = None
  final_learning_rate_fraction: float | None = None
  attention: dict = dataclasses.field(default_factory=dict)
  model: dict = dataclasses.field(default_factory=dict)
  data: dict = dataclasses.field(default_factory=dict)
  name: str = dataclasses.field(default="", init=False)  # gin scope, not a binding

  def __post_init__(self):
    object.__setattr__(self, "name", gin.current_scope_str())
    check_types(self)
    if self.steps < 1:
      raise ConfigError(f"{self.binding('steps')} = {self.steps}: every stage needs steps >= 1 "
                        f"(bind {self.binding('steps')}).")
    if self.batch_size is not None and self.batch_tokens is not None:
      raise ConfigError(f"{self.binding('batch_size')} and {self.binding('batch_tokens')} are "
                        "both set: give the batch as rows or as tokens, not both.")

  def binding(self, field: str) -> str:
    """The gin binding of `field`: `long/Stage.steps`."""
    return f"{self.name + '/' if self.name else ''}Stage.{field}"

  def record(self) -> dict:
    """The stage as JSON data (what a checkpoint keeps to compare on resume)."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return json.loads(json.dumps(fields))


@dataclasses.dataclass(frozen=True)
class Planned:
  """A stage placed in the run: global steps [start, end) under `run`."""
  index: int
  name: str
  start: int
  end: int
  run: object  # lcjax.run.Run

  @property
  def label(self) -> str:
    return f"stage {self.index}" + (f" ({self.name})" if self.name else "")


def plan(run) -> list[Planned]:
  """The run's stages in order; a run without stages is one stage of TrainConfig.steps."""
  stages = run.train.stages
  if not stages:
    return [Planned(0, "", 0, run.train.steps, run)]
  ends = np.cumsum([s.steps for s in stages]).tolist()
  return [Planned(i, s.name, end - s.steps, end, stage_run(run, s))
          for i, (s, end) in enumerate(zip(stages, ends))]


def stage_at(planned: list[Planned], step: int) -> int:
  """The index of the stage that takes the step after `step` (the last one when done)."""
  return next((p.index for p in planned if step < p.end), planned[-1].index)


def run_at(run, step: int):
  """The Run that trained step `step` (a checkpoint's step): the one to evaluate it with (its
  stage's RoPE settings and sequence length)."""
  planned = plan(run)
  return planned[stage_at(planned, max(step - 1, 0))].run


def check_steps(stages, steps: int) -> None:
  """TrainConfig.steps must be the stages' total (the loop and the schedule end there)."""
  total = sum(s.steps for s in stages)
  if stages and total != steps:
    each = ", ".join(f"{s.binding('steps')} = {s.steps}" for s in stages)
    raise ConfigError(f"TrainConfig.steps = {steps}, but the stages sum to {total} steps "
                      f"({each}). Set TrainConfig.steps = {total}.")


def stage_run(base, stage: Stage):
  """The Run `stage` trains under: `base` with the stage's overrides (a Run's copy)."""
  try:
    named = {"sequence_length": stage.sequence_length, "train_mixture": stage.train_mixture}
    data = _replace(base.data, {**stage.data, **{k: v for k, v in named.items() if v is not None}},
                    stage.binding("data"))
    attention = _replace(base.model.attention, stage.attention, stage.binding("attention"))
    model = _replace(base.model, {**stage.model, "attention": attention},
                     stage.binding("model"))
    rows = _rows(stage, data.sequence_length) or base.train.batch_size
    train = dataclasses.replace(base.train, batch_size=rows)
  except ConfigError as e:
    raise type(e)(f"In stage {stage.name or '(unnamed)'}: {e}") from e
  return dataclasses.replace(base, model=model, data=data, train=train)


def with_attention(run, overrides: dict, binding: str):
  """`run` with its AttentionConfig's fields replaced by `overrides` (from gin `binding`)."""
  attention = _replace(run.model.attention, overrides, binding)
  return dataclasses.replace(run, model=dataclasses.replace(run.model, attention=attention))


def _rows(stage: Stage, seq_len: int) -> int | None:
  if stage.batch_tokens is None:
    return stage.batch_size
  if stage.batch_tokens % seq_len:
    raise ConfigError(
        f"{stage.binding('batch_tokens')} = {stage.batch_tokens} is not a multiple of the "
        f"stage's sequence length {seq_len}: a batch holds whole rows.")
  return stage.batch_tokens // seq_len


def _replace(config, overrides: dict, binding: str | None):
  """`config` with `overrides` (validated again by its __post_init__); an unknown field is a
  ConfigError naming `binding` and the fields there are."""
  fields = {f.name for f in dataclasses.fields(config) if f.init}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ConfigError(f"{binding} names {unknown}, not fields of {type(config).__name__} "
                      f"(its fields: {sorted(fields)}).")
  return dataclasses.replace(config, **overrides)


def learning_rate(run) -> optax.Schedule:
  """One schedule over the whole run: without stages, OptimConfig's warmup + cosine over
  TrainConfig.steps; with stages, each stage's warmup + cosine over its own steps, joined."""
  if not run.train.stages:
    return optim.schedule(run.optim, run.train.steps)
  pieces = [optim.schedule(stage_optim(run.optim, s), s.steps) for s in run.train.stages]
  ends = np.cumsum([s.steps for s in run.train.stages]).tolist()
  return optax.join_schedules(pieces, ends[:-1])


def stage_optim(base, stage: Stage):
  """The OptimConfig whose schedule is `stage`'s piece."""
  return dataclasses.replace(base, **{k: getattr(stage, k) for k in _SCHEDULE_FIELDS
                                      if getattr(stage, k) is not None})


def check_resumable(saved: list[dict] | None, stages, step: int, directory: str) -> None:
  """Resuming at `step` must not change the stages that have started: their steps, lengths and
  schedule made the checkpoint (and, for the current one, decide what comes next). Later stages
  may change. `saved` is the checkpoint's stage records (None: it predates them)."""
  now = [s.record() for s in stages]
  if saved is None or bool(saved) != bool(now):
    if saved is None and not now:
      return
    raise ConfigError(
        f"TrainConfig.stages changed since checkpoint step {step} in {directory} was written "
        f"({len(saved or [])} stages then, {len(now)} now): the learning-rate schedule and data "
        "follow the stages. Set TrainConfig.stages back to resume; to train otherwise, start a "
        "new --workdir (TrainConfig.init_from can start it from this run's parameters).")
  start = 0
  for i, old in enumerate(saved):
    if start >= step:
      break
    new = now[i] if i < len(now) else None
    changed = [k for k in old if k != "name" and (new is None or new[k] != old[k])]
    if changed:
      where = stages[i].binding(changed[0]) if new else f"TrainConfig.stages[{i}]"
      was, got = old[changed[0]], "removed" if new is None else new[changed[0]]
      raise ConfigError(
          f"{where}: {was} -> {got} since checkpoint step {step} in {directory} was written, "
          f"but stage {i} had started by then (it began at step {start}): resuming would "
          f"change what trained it. Set {where} back; later stages may change.")
    start += old["steps"]
