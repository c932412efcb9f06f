"""The one train loop: gin-configured, sharded, checkpointed, resumable.

    Run -> build (lcjax.run) -> state (fresh or restored) -> jitted step, repeated:
    log every `log_every`, eval every `eval_every`, checkpoint every `checkpoint_every`;
    SIGTERM saves a checkpoint and stops.
"""

import contextlib
import math
import os
import signal
import threading

import gin
import jax
import tqdm

from lcjax.data.pipeline import make_train_iterator
from lcjax.eval.evaluate import evaluate
from lcjax.parallel import sharding
from lcjax.run import Run, Setup, build, load_eval_batches
from lcjax.train import flops
from lcjax.train import state as train_state
from lcjax.train.checkpoint import Checkpointer
from lcjax.train.metrics import MetricsWriter, Throughput
from lcjax.train.step import make_train_step


class NonFiniteLossError(FloatingPointError):
  pass


def train(workdir: str, run: Run | None = None) -> dict:
  """Trains (resuming from the newest checkpoint in `workdir`) and returns a summary."""
  run = run or Run.from_gin()
  cfg = run.train
  os.makedirs(workdir, exist_ok=True)
  with contextlib.ExitStack() as cleanup:
    # ---- Assemble: mesh, shardings, optimizer; this process's share of the data.
    setup = build(run)
    data = make_train_iterator(run.data, cfg.batch_size // setup.data_shards,
                               shard_index=setup.data_shard, num_shards=setup.data_shards)
    _describe(workdir, setup)  # after every configurable (data tasks too) has been read

    # ---- State: the newest checkpoint's, or fresh; the jitted step; eval data.
    ckpt = cleanup.enter_context(contextlib.closing(
        Checkpointer(workdir, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints)))
    state, start = _restore_or_init(run, setup, ckpt, data)
    step_fn = _jit_train_step(setup, cfg.grad_accum_steps)
    eval_batches = load_eval_batches(run)

    # ---- Outputs: metrics and progress bar (process 0), throughput, the summary returned.
    writer, bar = _progress(workdir, cfg.steps, start, cleanup)
    pending, throughput, summary = _PendingMetrics(ckpt), _throughput(run), _summary(workdir, ckpt)
    preempted = cleanup.enter_context(_sigterm_flag())

    # ---- Loop: a step; then log, eval and checkpoint when due; on SIGTERM save and stop.
    step = start
    while step < cfg.steps:
      if preempted.is_set():
        _save(ckpt, pending, step, state, data, force=True)
        summary["preempted"] = True
        print(f"\nSIGTERM: saved checkpoint at step {step}, exiting.")
        break
      state, metrics = step_fn(state, setup.put_batch(next(data), cfg.batch_size))
      step += 1
      pending.add(step, metrics)
      throughput.step()
      bar.update(1)
      if _due(step, cfg.log_every, cfg.steps):
        summary["train"] = _log(step, pending.drain(), throughput, writer, bar)
      if _due(step, cfg.eval_every, cfg.steps):
        pending.drain()
        with throughput.excluded():  # eval time is not training throughput
          summary["eval"] = evaluate(setup.eval_step, state["params"], eval_batches)
        writer.write(step, summary["eval"])
      if _due(step, cfg.checkpoint_every, cfg.steps):
        _save(ckpt, pending, step, state, data, force=step == cfg.steps)
  summary["step"] = step
  return summary


def _due(step: int, every: int, last: int) -> bool:
  return step % every == 0 or step == last


def _describe(workdir: str, setup: Setup) -> None:
  """Process 0 writes the operative gin config and prints how the model is sharded."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, "config.gin"), "w") as f:
    f.write(gin.operative_config_str())
  print(sharding.describe(setup.abstract_params, setup.mesh, setup.rules))
  if setup.sequence is not None:
    seq = setup.sequence
    print(f"sequence parallel: {seq.shards} shards over '{seq.seq_axis}', layout "
          f"{seq.layout!r}, attention {seq.config.attention!r}")


def _restore_or_init(run: Run, setup: Setup, ckpt: Checkpointer, data) -> tuple[dict, int]:
  """(state, step): the newest checkpoint's (the data iterator's position too), else fresh."""
  start = ckpt.latest_step()
  if start is None:
    return train_state.init_state(run.model, run.train.seed, setup.optimizer,
                                  setup.shardings), 0
  state, data_state = ckpt.restore(start, setup.abstract_state())
  data.restore(data_state)
  print(f"Resumed from {ckpt.directory}/{start}")
  return state, start


def _jit_train_step(setup: Setup, accum_steps: int):
  step = make_train_step(setup.graphdef, setup.optimizer, setup.schedule, accum_steps)
  return jax.jit(step, in_shardings=(setup.shardings, setup.batch_sharding),
                 out_shardings=(setup.shardings, setup.replicated), donate_argnums=0)


def _progress(workdir: str, steps: int, start: int, cleanup: contextlib.ExitStack):
  """(metrics writer, progress bar), both silent off process 0, closed with `cleanup`."""
  is_main = jax.process_index() == 0
  writer = cleanup.enter_context(contextlib.closing(MetricsWriter(workdir, enabled=is_main)))
  bar = cleanup.enter_context(tqdm.tqdm(total=steps, initial=start, disable=not is_main,
                                        dynamic_ncols=True, mininterval=1.0))
  return writer, bar


def _throughput(run: Run) -> Throughput:
  cfg, seq_len = run.train, run.data.sequence_length
  peak = cfg.peak_flops_per_device or flops.peak_flops(jax.devices()[0].device_kind)
  return Throughput(cfg.batch_size * seq_len, flops.train_flops_per_token(run.model, seq_len),
                    peak * jax.device_count() if peak else None)


def _summary(workdir: str, ckpt: Checkpointer) -> dict:
  root = os.path.abspath(workdir)
  return {"workdir": root, "checkpoints": ckpt.directory, "tensorboard": os.path.join(root, "tb"),
          "metrics": os.path.join(root, "metrics.jsonl"), "preempted": False, "train": {},
          "eval": {}}


@contextlib.contextmanager
def _sigterm_flag():
  """SIGTERM (preemption) sets the yielded event; the loop saves a checkpoint and exits."""
  flag = threading.Event()
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


class _PendingMetrics:
  """Train-step metrics still on the device. `drain` fetches them and stops the run at the first
  non-finite loss; `last_good` is the newest checkpoint written before it."""

  def __init__(self, ckpt: Checkpointer):
    self._ckpt, self._items, self.last_good = ckpt, [], ckpt.latest_step()

  def add(self, step: int, metrics: dict) -> None:
    self._items.append((step, metrics))

  def drain(self) -> list[tuple[int, dict]]:
    fetched = [(s, jax.device_get(m)) for s, m in self._items]
    self._items.clear()
    for s, m in fetched:
      if not (math.isfinite(float(m["loss"])) and math.isfinite(float(m["grad_norm"]))):
        raise NonFiniteLossError(
            f"Loss or gradient norm became non-finite at step {s} (loss={float(m['loss'])}, "
            f"grad_norm={float(m['grad_norm'])}). No checkpoint was written after it; the "
            f"last good one is step {self.last_good} in {self._ckpt.directory}. Lower "
            "OptimConfig.peak_learning_rate, raise warmup_steps, or check the data.")
    return fetched


def _log(step: int, fetched: list, throughput: Throughput, writer: MetricsWriter, bar) -> dict:
  """Writes the newest step's metrics with the throughput since the last log."""
  _, metrics = fetched[-1]
  logged = {k: float(v) for k, v in metrics.items() if k != "loss_tokens"}
  logged.update(throughput.report())
  writer.write(step, logged)
  bar.set_postfix(loss=f"{logged['loss']:.3f}", lr=f"{logged['lr']:.1e}")
  return {"step": step, **logged}


def _save(ckpt: Checkpointer, pending: _PendingMetrics, step: int, state, data,
          force: bool) -> None:
  """Checkpoints `step` when due (or `force`), once its metrics are known to be finite."""
  pending.drain()
  if ckpt.save(step, state, data.state(), force=force):
    pending.last_good = step
