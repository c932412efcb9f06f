"""The one train loop: gin-configured, sharded, checkpointed, resumable.

    configs -> mesh -> data -> state (fresh or restored) -> jitted step, repeated:
    log every `log_every`, eval every `eval_every`, checkpoint every `checkpoint_every`.
"""

import dataclasses
import math
import os
import signal
import time

import gin
import jax
import numpy as np
import tqdm
from jax.sharding import NamedSharding, PartitionSpec

from lcjax.config import check_types
from lcjax.data.pipeline import (
  DataConfig,
  make_eval_batches,
  make_train_iterator,
  vocabulary,
)
from lcjax.eval.evaluate import evaluate, make_eval_step
from lcjax.models.config import ModelConfig
from lcjax.parallel import sharding
from lcjax.parallel.layout import permute_batch, unpermute
from lcjax.parallel.mesh import MeshConfig, make_mesh
from lcjax.parallel.sequence import SequenceConfig, SequenceSharding
from lcjax.train import flops, optim
from lcjax.train import state as train_state
from lcjax.train.checkpoint import Checkpointer, abstract_with_shardings
from lcjax.train.metrics import MetricsWriter
from lcjax.train.step import make_train_step


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
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

  def __post_init__(self):
    check_types(self)
    for name in ("steps", "batch_size", "grad_accum_steps", "log_every", "eval_every",
                 "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}.")
    if self.batch_size % self.grad_accum_steps:
      raise ValueError(
          f"TrainConfig.batch_size={self.batch_size} is not divisible by grad_accum_steps="
          f"{self.grad_accum_steps}; each microbatch must have the same number of rows.")


class NonFiniteLossError(FloatingPointError):
  pass


@dataclasses.dataclass
class Run:
  """Everything a run needs, built once from the gin-configured dataclasses."""
  model: ModelConfig
  data: DataConfig
  train: TrainConfig
  optim: optim.OptimConfig
  mesh_config: MeshConfig

  @classmethod
  def from_gin(cls) -> "Run":
    return cls(ModelConfig(), DataConfig(), TrainConfig(), optim.OptimConfig(), MeshConfig())


def check_vocabulary(model_cfg: ModelConfig, data_cfg: DataConfig) -> None:
  size = vocabulary(data_cfg).vocab_size
  if model_cfg.vocab_size < size:
    raise ValueError(
        f"ModelConfig.vocab_size={model_cfg.vocab_size} is smaller than the data vocabulary "
        f"({data_cfg.vocabulary!r}, {size} ids). Set ModelConfig.vocab_size >= {size} (a "
        "multiple of 128 is fastest).")


def build(run: Run):
  """Mesh, shardings, optimizer and jitted functions shared by training and evaluation."""
  mesh = make_mesh(run.mesh_config)
  rules = sharding.logical_rules()
  seq_len = run.data.sequence_length
  sharding.check_batch(run.train.batch_size // run.train.grad_accum_steps, seq_len, mesh, rules)
  check_vocabulary(run.model, run.data)
  sequence = SequenceSharding.create(mesh, rules, SequenceConfig())
  if sequence is not None:
    sequence.check(seq_len)
  layout, shards = (sequence.layout, sequence.shards) if sequence else ("contiguous", 1)
  graphdef, abstract_params = train_state.model_skeleton(run.model, sequence)
  schedule = optim.schedule(run.optim, run.train.steps)
  optimizer = optim.make_optimizer(
      run.optim, run.train.steps, optim.decay_mask(abstract_params, run.optim))
  shardings = train_state.state_shardings(abstract_params, optimizer, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())

  # This process's share of a train batch: its rows (processes holding the same rows, with the
  # sequence split across them, load the same data) and, of those, its positions.
  train_rows, _, data_shard, data_shards = sharding.process_share(
      batch_sharding, (run.train.batch_size, seq_len))

  def put_batch(rows: dict, global_rows: int):
    """This process's rows of a host batch (whole rows, original order) -> global arrays:
    permuted into the sequence layout, then each process's positions of them."""
    rows = permute_batch(rows, layout, shards)
    _, positions, _, _ = sharding.process_share(batch_sharding, (global_rows, seq_len))
    return {k: jax.make_array_from_process_local_data(batch_sharding, v[:, positions],
                                                      (global_rows, seq_len))
            for k, v in rows.items()}

  jitted_eval = jax.jit(make_eval_step(graphdef),
                        in_shardings=(shardings["params"], batch_sharding),
                        out_shardings=replicated)

  def eval_step(params, batch: dict):
    """A whole host batch (every process passes the same) -> host (losses, correct), in the
    batch's original token order."""
    global_rows = next(iter(batch.values())).shape[0]
    rows, _, _, _ = sharding.process_share(batch_sharding, (global_rows, seq_len))
    out = jax.device_get(jitted_eval(params, put_batch(
        {k: v[rows] for k, v in batch.items()}, global_rows)))
    return tuple(unpermute(np.asarray(x), layout, shards) for x in out)

  return dict(mesh=mesh, rules=rules, graphdef=graphdef, abstract_params=abstract_params,
              schedule=schedule, optimizer=optimizer, shardings=shardings,
              batch_sharding=batch_sharding, put_batch=put_batch, eval_step=eval_step,
              sequence=sequence, train_rows=train_rows, data_shard=data_shard,
              data_shards=data_shards)


def load_eval_batches(run: Run) -> dict:
  """Each eval task's validation batches, whole (every process loads them all: they are small,
  and the metrics compare them with the gathered outputs)."""
  rows = run.train.batch_size // run.train.grad_accum_steps
  return {task: make_eval_batches(run.data, task, rows, run.train.eval_batches)
          for task in run.data.eval_tasks}


def _install_sigterm():
  """SIGTERM (preemption) sets a flag; the loop saves a checkpoint and exits cleanly."""
  flag = {"set": False}

  def handler(signum, frame):
    flag["set"] = True

  previous = signal.signal(signal.SIGTERM, handler)
  return flag, previous


def train(workdir: str, run: Run | None = None) -> dict:
  """Trains (resuming from the newest checkpoint in `workdir`) and returns a summary."""
  run = run or Run.from_gin()
  cfg = run.train
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  b = build(run)
  seq_len = run.data.sequence_length
  ckpt = Checkpointer(workdir, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints)
  data = make_train_iterator(run.data, cfg.batch_size // b["data_shards"],
                             shard_index=b["data_shard"], num_shards=b["data_shards"])
  if is_main:  # after every configurable (data tasks included) has been read, before compiling
    with open(os.path.join(workdir, "config.gin"), "w") as f:
      f.write(gin.operative_config_str())
    print(sharding.describe(b["abstract_params"], b["mesh"], b["rules"]))
    if b["sequence"] is not None:
      seq = b["sequence"]
      print(f"sequence parallel: {seq.shards} shards over '{seq.seq_axis}', layout "
            f"{seq.layout!r}, attention {seq.config.attention!r}")
  abstract = train_state.abstract_state(b["abstract_params"], b["optimizer"])
  start = ckpt.latest_step()
  if start is None:
    state = train_state.init_state(run.model, cfg.seed, b["optimizer"], b["shardings"])
    start = 0
  else:
    state, data_state = ckpt.restore(start, abstract_with_shardings(abstract, b["shardings"]))
    data.restore(data_state)
    print(f"Resumed from {ckpt.directory}/{start}")

  step_fn = jax.jit(
      make_train_step(b["graphdef"], b["optimizer"], b["schedule"], cfg.grad_accum_steps),
      in_shardings=(b["shardings"], b["batch_sharding"]),
      out_shardings=(b["shardings"], NamedSharding(b["mesh"], PartitionSpec())),
      donate_argnums=0,
  )
  eval_batches = load_eval_batches(run)
  writer = MetricsWriter(workdir, enabled=is_main)
  n_devices = jax.device_count()
  peak = cfg.peak_flops_per_device or flops.peak_flops(jax.devices()[0].device_kind)
  flops_per_token = flops.train_flops_per_token(run.model, seq_len)
  tokens_per_step = cfg.batch_size * seq_len

  preempt, previous_handler = _install_sigterm()
  pending = []  # (step, device metrics) not yet checked on the host
  last_good = ckpt.latest_step()
  summary = {"workdir": os.path.abspath(workdir), "checkpoints": ckpt.directory,
             "tensorboard": os.path.join(os.path.abspath(workdir), "tb"),
             "metrics": os.path.join(os.path.abspath(workdir), "metrics.jsonl"),
             "preempted": False, "train": {}, "eval": {}}

  def drain():
    """Fetches pending metrics; stops the run at the first non-finite loss."""
    fetched = [(s, jax.device_get(m)) for s, m in pending]
    pending.clear()
    for s, m in fetched:
      if not (math.isfinite(float(m["loss"])) and math.isfinite(float(m["grad_norm"]))):
        raise NonFiniteLossError(
            f"Loss or gradient norm became non-finite at step {s} (loss={float(m['loss'])}, "
            f"grad_norm={float(m['grad_norm'])}). No checkpoint was written after it; the "
            f"last good one is step {last_good} in {ckpt.directory}. Lower "
            "OptimConfig.peak_learning_rate, raise warmup_steps, or check the data.")
    return fetched

  step = start
  bar = tqdm.tqdm(total=cfg.steps, initial=start, disable=not is_main, dynamic_ncols=True,
                  mininterval=1.0)
  t_last, steps_since = time.perf_counter(), 0
  try:
    while step < cfg.steps:
      if preempt["set"]:
        drain()
        ckpt.save(step, state, data.state(), force=True)
        last_good = step
        summary["preempted"] = True
        print(f"\nSIGTERM: saved checkpoint at step {step}, exiting.")
        break
      state, metrics = step_fn(state, b["put_batch"](next(data), cfg.batch_size))
      step += 1
      steps_since += 1
      pending.append((step, metrics))
      bar.update(1)

      if step % cfg.log_every == 0 or step == cfg.steps:
        fetched = drain()
        elapsed = time.perf_counter() - t_last
        s, m = fetched[-1]
        tokens_per_sec = steps_since * tokens_per_step / elapsed
        logged = {k: float(v) for k, v in m.items() if k != "loss_tokens"}
        logged.update(
            tokens_per_sec=tokens_per_sec,
            step_time=elapsed / steps_since,
            mfu=(flops_per_token * tokens_per_sec / (peak * n_devices)) if peak else None)
        writer.write(step, logged)
        bar.set_postfix(loss=f"{logged['loss']:.3f}", lr=f"{logged['lr']:.1e}")
        summary["train"] = {"step": step, **logged}
        t_last, steps_since = time.perf_counter(), 0

      if step % cfg.eval_every == 0 or step == cfg.steps:
        drain()
        results = evaluate(b["eval_step"], state["params"], eval_batches)
        writer.write(step, results)
        summary["eval"] = results
        t_last = time.perf_counter()  # eval time is not training throughput

      if step % cfg.checkpoint_every == 0 or step == cfg.steps:
        drain()
        if ckpt.save(step, state, data.state(), force=step == cfg.steps):
          last_good = step
  finally:
    bar.close()
    signal.signal(signal.SIGTERM, previous_handler)
    ckpt.close()
    writer.close()
  summary["step"] = step
  return summary
