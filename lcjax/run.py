"""A run's assembly, shared by training and evaluation.

    gin -> Run (the configs) -> build(run) -> Setup: mesh, shardings, optimizer, data share,
    and the jitted eval step; lcjax.train and lcjax.eval read what they need from it.
"""

import dataclasses
from typing import Callable

import gin
import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcjax.config import check_positive, check_types
from lcjax.data.pipeline import DataConfig, check_anchor, make_eval_batches, vocabulary
from lcjax.errors import ConfigError
from lcjax.models.config import ModelConfig
from lcjax.models.loss import token_losses
from lcjax.parallel import sharding
from lcjax.parallel.layout import permute_batch, unpermute
from lcjax.parallel.mesh import MeshConfig, make_mesh
from lcjax.parallel.sequence import SequenceConfig, SequenceSharding
from lcjax.train import optim, stages
from lcjax.train import state as train_state
from lcjax.train.stages import Stage

INIT_MODES = ("params", "params_and_optimizer")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The run's schedule and batch; eval reads it too (batch rows, eval_batches, checkpoints)."""
  steps: int = 1000
  batch_size: int = 16  # global rows per optimizer step (all processes, all microbatches)
  grad_accum_steps: int = 1
  seed: int = 0
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 4  # per eval task
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  peak_flops_per_device: float | None = None  # None: looked up from the device kind
  # A damaged newest checkpoint on resume: "stop" with a message, or "fallback": set it aside
  # (DIR/quarantine/) and resume from the newest intact one.
  on_corrupt_checkpoint: str = "stop"
  # Training stages, in order (lcjax.train.stages); empty: one stage of `steps` steps. With
  # stages, `steps` must be their total.
  stages: tuple[Stage, ...] = ()
  # Start from another run's checkpoint, "DIR[:STEP]" (its workdir or checkpoints/ directory;
  # the newest step by default), when this workdir has no checkpoint of its own. init_mode:
  # "params", or "params_and_optimizer" (moments too); the step counter starts at 0.
  init_from: str | None = None
  init_mode: str = "params"
  # (start, stop): a jax.profiler trace of steps start..stop (1-based, inclusive) in
  # DIR/profile/ (lcjax.train.profile); None: no trace.
  profile_steps: tuple[int, int] | None = None
  # A Weights & Biases project to copy the step and eval metrics to (lcjax.train.wandb_log);
  # None: TensorBoard and metrics.jsonl only.
  wandb_project: str | None = None

  def __post_init__(self):
    if isinstance(self.stages, list):  # gin gives a list
      object.__setattr__(self, "stages", tuple(self.stages))
    check_types(self)
    check_positive(self, ("steps", "batch_size", "grad_accum_steps", "log_every", "eval_every",
                          "checkpoint_every", "keep_checkpoints"))
    if self.batch_size % self.grad_accum_steps:
      raise ConfigError(
          f"TrainConfig.batch_size={self.batch_size} is not divisible by grad_accum_steps="
          f"{self.grad_accum_steps}; each microbatch must have the same number of rows.")
    if self.on_corrupt_checkpoint not in ("stop", "fallback"):
      raise ConfigError(
          f"TrainConfig.on_corrupt_checkpoint = {self.on_corrupt_checkpoint!r}; expected "
          "'stop' or 'fallback'.")
    if self.init_mode not in INIT_MODES:
      raise ConfigError(f"TrainConfig.init_mode = {self.init_mode!r}; expected one of "
                        f"{INIT_MODES}.")
    stages.check_steps(self.stages, self.steps)
    if self.profile_steps is not None:
      start, stop = self.profile_steps
      if not 1 <= start <= stop <= self.steps:
        raise ConfigError(
            f"TrainConfig.profile_steps = {self.profile_steps} must be (start, stop) with "
            f"1 <= start <= stop <= TrainConfig.steps = {self.steps}, e.g. (10, 12).")


@dataclasses.dataclass
class Run:
  """Everything a run is configured by: the gin-configured dataclasses."""
  model: ModelConfig
  data: DataConfig
  train: TrainConfig
  optim: optim.OptimConfig
  mesh_config: MeshConfig

  @classmethod
  def from_gin(cls) -> "Run":
    return cls(ModelConfig(), DataConfig(), TrainConfig(), optim.OptimConfig(), MeshConfig())


@dataclasses.dataclass(frozen=True)
class Setup:
  """What `build` assembles from a Run, once, for training and evaluation."""
  mesh: Mesh
  rules: tuple  # logical axis name -> mesh axes
  graphdef: nnx.GraphDef
  abstract_params: nnx.State  # shapes with logical_axes metadata, nothing allocated
  schedule: optax.Schedule
  optimizer: optax.GradientTransformation
  shardings: dict  # of the train state {"step", "params", "opt_state"}
  batch_sharding: NamedSharding  # [batch, seq] arrays
  replicated: NamedSharding
  # put_batch(this process's rows of a host batch, global rows) -> global arrays
  put_batch: Callable[[dict, int], dict]
  # eval_step(params, whole host batch) -> host (losses, correct) [batch, seq], for rows of
  # DataConfig.sequence_length tokens; `eval_step_at` makes one for any other length.
  eval_step: Callable[[dict, dict], tuple[np.ndarray, np.ndarray]]
  # The jitted step on global arrays in the sequence layout (retraced per batch shape).
  jitted_eval_step: Callable
  sequence: SequenceSharding | None  # None: rows are not split over devices
  train_rows: slice  # this process's rows of a train batch
  data_shard: int  # which equal share of the train rows they are ...
  data_shards: int  # ... of how many

  def abstract_state(self) -> dict:
    """The train state's shapes, dtypes and target shardings (what a restore fills)."""
    return train_state.abstract_with_shardings(
        train_state.abstract_state(self.abstract_params, self.optimizer), self.shardings)

  def eval_step_at(self, seq_len: int) -> Callable[[dict, dict], tuple[np.ndarray, np.ndarray]]:
    """`eval_step` for rows of `seq_len` tokens (any length the mesh can split, e.g. several
    times the training length): the same jitted step, mesh and sequence layout.

    Fails, naming the fix, when the sequence shards cannot split `seq_len`; the batch's rows
    are checked against the mesh at each call."""
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
      raise ConfigError(f"eval_step_at: seq_len={seq_len!r} must be a positive int.")
    seq_len = int(seq_len)
    if self.sequence is not None:
      self.sequence.check(seq_len)
    return _host_eval_step(self.jitted_eval_step, self.rules, self.batch_sharding,
                           self.sequence, seq_len)


def check_vocabulary(model_cfg: ModelConfig, data_cfg: DataConfig) -> None:
  size = vocabulary(data_cfg).vocab_size
  if model_cfg.vocab_size < size:
    raise ConfigError(
        f"ModelConfig.vocab_size={model_cfg.vocab_size} is smaller than the data vocabulary "
        f"({data_cfg.vocabulary!r}, {size} ids). Set ModelConfig.vocab_size >= {size} (a "
        "multiple of 128 is fastest).")


def build(run: Run) -> Setup:
  """Checks the configs against each other and the devices, then assembles the run."""
  mesh, rules = make_mesh(run.mesh_config), sharding.logical_rules()
  seq_len = run.data.sequence_length
  check_vocabulary(run.model, run.data)
  check_anchor(run.model, run.data)
  sequence = SequenceSharding.create(mesh, rules, SequenceConfig())
  for rows, length in train_shapes(run):
    sharding.check_batch(rows // run.train.grad_accum_steps, length, mesh, rules)
    if sequence is not None:
      sequence.check(length)
  # Training may differ from evaluation (S²-Attn); the parameters are the same.
  graphdef, abstract_params = train_state.model_skeleton(run.model, sequence)
  eval_graphdef, _ = train_state.model_skeleton(run.model.for_inference(), sequence)
  schedule = stages.learning_rate(run)
  optimizer = optim.make_optimizer(run.optim, schedule,
                                   optim.decay_mask(abstract_params, run.optim))
  shardings = train_state.state_shardings(abstract_params, optimizer, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  put_batch = _batch_placer(batch_sharding, sequence)
  # This process's share of a train batch: its rows (processes holding the same rows, with the
  # sequence split across them, load the same data) and, of those, its positions.
  train_rows, _, data_shard, data_shards = sharding.process_share(
      batch_sharding, (run.train.batch_size, seq_len))
  jitted_eval_step = jax.jit(_eval_step(eval_graphdef),
                             in_shardings=(shardings["params"], batch_sharding),
                             out_shardings=replicated)
  eval_step = _host_eval_step(jitted_eval_step, rules, batch_sharding, sequence, seq_len)
  return Setup(
      mesh=mesh, rules=rules, graphdef=graphdef, abstract_params=abstract_params,
      schedule=schedule, optimizer=optimizer,
      shardings=shardings, batch_sharding=batch_sharding, replicated=replicated,
      put_batch=put_batch, eval_step=eval_step, jitted_eval_step=jitted_eval_step,
      sequence=sequence, train_rows=train_rows, data_shard=data_shard, data_shards=data_shards)


def _layout(sequence: SequenceSharding | None) -> tuple[str, int]:
  return (sequence.layout, sequence.shards) if sequence else ("contiguous", 1)


def train_shapes(run: Run) -> list[tuple[int, int]]:
  """(global rows, length) of every train batch shape: one, or one per length bucket (a bucket
  2^j times shorter than sequence_length has 2^j times the rows: constant tokens)."""
  longest, rows = run.data.sequence_length, run.train.batch_size
  return [(rows * (longest // n), n) for n in (run.data.length_buckets or (longest,))]


def _batch_placer(batch_sharding, sequence):
  layout, shards = _layout(sequence)

  def put_batch(rows: dict, global_rows: int) -> dict:
    """This process's rows of a host batch (whole rows, original order) -> global arrays:
    permuted into the sequence layout, then each process's positions of them."""
    seq_len = next(iter(rows.values())).shape[1]
    rows = permute_batch(rows, layout, shards)
    _, positions, _, _ = sharding.process_share(batch_sharding, (global_rows, seq_len))
    return {k: jax.make_array_from_process_local_data(batch_sharding, v[:, positions],
                                                      (global_rows, seq_len))
            for k, v in rows.items()}

  return put_batch


def _eval_step(graphdef):
  """eval_step(params, batch) -> (per-token loss [batch, seq] f32, correct [batch, seq] bool)."""
  def eval_step(params, batch):
    losses, predictions = token_losses(graphdef, params, batch)
    return losses, predictions == batch["targets"]
  return eval_step


def _host_eval_step(jitted_eval, rules, batch_sharding, sequence, seq_len: int):
  layout, shards = _layout(sequence)
  put_batch = _batch_placer(batch_sharding, sequence)

  def eval_step(params, batch: dict):
    """A whole host batch (every process passes the same) -> host (losses, correct), in the
    batch's original token order."""
    global_rows, length = next(iter(batch.values())).shape
    if length != seq_len:
      raise ValueError(f"This eval step takes rows of {seq_len} tokens, got {length}: make "
                       f"one for that length with Setup.eval_step_at({length}).")
    sharding.check_batch(global_rows, seq_len, batch_sharding.mesh, rules)
    rows, _, _, _ = sharding.process_share(batch_sharding, (global_rows, seq_len))
    out = jax.device_get(jitted_eval(params, put_batch(
        {k: v[rows] for k, v in batch.items()}, global_rows)))
    return tuple(unpermute(np.asarray(x), layout, shards) for x in out)

  return eval_step


def load_eval_batches(run: Run) -> dict[str, list[dict]]:
  """Each eval task's validation batches, whole (every process loads them all: they are small,
  and the metrics compare them with the gathered outputs)."""
  rows = run.train.batch_size // run.train.grad_accum_steps
  return {task: make_eval_batches(run.data, task, rows, run.train.eval_batches)
          for task in run.data.eval_tasks}
