"""The one train loop: gin-configured, sharded, checkpointed, resumable.

    Run -> stages (lcjax.train.stages) -> build (lcjax.run) each -> state (restored, from
    another run, or fresh) -> per stage, its jitted step, repeated: log every `log_every`,
    eval every `eval_every`, checkpoint every `checkpoint_every` and at the stage's end;
    SIGTERM saves a checkpoint and stops; a non-finite step stops the run and sets aside the
    checkpoints it poisoned.
"""

import contextlib
import math
import signal
import threading

import gin
import jax
import tqdm
from flax import nnx

from lcjax.config import binding_changes
from lcjax.data import tasks
from lcjax.data.pipeline import make_train_iterator
from lcjax import paths
from lcjax.errors import CheckpointMismatchError, ConfigError, NonFiniteLossError
from lcjax.eval.evaluate import evaluate
from lcjax.eval.suite import EvalConfig, InLoop
from lcjax.parallel import sharding
from lcjax.run import Run, Setup, TrainConfig, build, load_eval_batches
from lcjax.train import flops, init_from, stages
from lcjax.train import state as train_state
from lcjax.train.checkpoint import Checkpointer
from lcjax.train.memory import device_memory
from lcjax.train.metrics import MetricsWriter, Throughput
from lcjax.train.profile import StepProfiler
from lcjax.train.shapes import array_differences
from lcjax.train.step import make_train_step
from lcjax.train.wandb_log import WandbLog
from lcjax.workdir import prepare_workdir


def train(workdir: str, run: Run | None = None) -> dict:
  """Trains (resuming from the newest checkpoint in `workdir`) and returns a summary."""
  run = run or Run.from_gin()
  workdir = prepare_workdir(workdir)
  planned = stages.plan(run)
  with contextlib.ExitStack() as cleanup:
    # ---- Assemble every stage before training any: a bad stage fails now, not hours in.
    setups = _build_stages(planned)
    config = _operative_config(planned[0].run)

    # ---- State: the newest checkpoint's, another run's (init_from), or fresh.
    ckpt = cleanup.enter_context(contextlib.closing(Checkpointer(
        workdir, every=run.train.checkpoint_every, keep=run.train.keep_checkpoints)))
    state, start, saved_data = _restore_or_init(run, setups[0], ckpt, config)
    _describe(workdir, setups[0], config, start)

    # ---- Outputs: metrics and progress bar (process 0), the summary returned.
    writer, bar = _progress(workdir, run.train, start, config, cleanup)
    loop = _Loop(ckpt, _PendingMetrics(ckpt, run, start), writer, bar, config,
                 {"stages": [s.record() for s in run.train.stages]},
                 _summary(workdir, ckpt), cleanup.enter_context(_sigterm_flag()),
                 StepProfiler(workdir, run.train.profile_steps, cleanup))

    # ---- Stages: from the one the next step belongs to, each to its end (or SIGTERM).
    step = start
    for p in planned[stages.stage_at(planned, start):]:
      if step >= p.end or loop.summary["preempted"]:
        break
      state, step = loop.stage(p, setups[p.index], state, step, saved_data)
  loop.summary["step"] = step
  return loop.summary


def _build_stages(planned: list[stages.Planned]) -> list[Setup]:
  """Each stage's Setup; a stage whose parameters differ from the first stage's fails here,
  naming them (parameters and optimizer state carry over from stage to stage)."""
  setups = [build(p.run) for p in planned]
  first = nnx.to_pure_dict(setups[0].abstract_params)
  for p, setup in zip(planned[1:], setups[1:]):
    differences = array_differences(first, nnx.to_pure_dict(setup.abstract_params),
                                    "stage 0", p.label, f"stage 0 -> {p.label}")
    if differences:
      raise ConfigError(
          f"{p.label} changes the model's parameters: {'. '.join(differences)}. A stage may "
          "change only what the parameters do not depend on (sequence length, batch, RoPE, "
          "data, schedule): set its Stage.model / Stage.attention overrides back.")
  return setups


def _operative_config(run: Run) -> str:
  """The operative gin text, once every configurable a run reads was read (the data tasks'
  configs are read when they are registered)."""
  tasks.register_tasks(run.data)
  return gin.operative_config_str()


class _Loop:
  """What the stages of one `train` call share: checkpoints, metrics, progress, SIGTERM."""

  def __init__(self, ckpt, pending, writer, bar, config, record, summary, preempted, profiler):
    self.ckpt, self.pending, self.writer, self.bar = ckpt, pending, writer, bar
    self.config, self.record, self.summary, self.preempted = config, record, summary, preempted
    self.profiler = profiler

  def stage(self, p: stages.Planned, setup: Setup, state, step: int, saved_data):
    """Trains stage `p` from `step` to its end; its own data, jitted step, eval and throughput.
    `saved_data`: (stage index, data state) of the checkpoint resumed from, or None."""
    run, cfg = p.run, p.run.train
    data = make_train_iterator(run.data, cfg.batch_size // setup.data_shards,
                               shard_index=setup.data_shard, num_shards=setup.data_shards,
                               steps=p.end - p.start)
    if saved_data is not None and saved_data[0] == p.index:  # else it ended the stage before
      data.restore(saved_data[1])
    if run.train.stages:
      print(f"\n{p.label}: steps {step + 1}-{p.end}, sequence length "
            f"{run.data.sequence_length}, batch {cfg.batch_size}", flush=True)
    step_fn = _jit_train_step(setup, cfg.grad_accum_steps)
    eval_batches, in_loop = load_eval_batches(run), InLoop(setup, run, EvalConfig())
    throughput, record = _throughput(run), {**self.record, "stage": p.index}
    while step < p.end:
      if self.preempted.is_set():
        _preempt(self.ckpt, self.pending, step, state, data, self.config, record)
        self.summary["preempted"] = True
        break
      batch = next(data)  # rows x length vary with DataConfig.length_buckets; tokens do not
      global_rows = next(iter(batch.values())).shape[0] * setup.data_shards
      self.profiler.before(step + 1)
      state, metrics = step_fn(state, setup.put_batch(batch, global_rows))
      step += 1
      self.profiler.after(step, (state, metrics))
      self.ckpt.check()  # a background save that failed (a full disk) stops the run here
      self.pending.add(step, metrics)
      throughput.step()
      self.bar.update(1)
      if _due(step, cfg.log_every, p.end):
        self.summary["train"] = _log(step, self.pending.drain(), throughput, self.writer,
                                     self.bar, p)
      if _due(step, cfg.eval_every, p.end):
        self.pending.drain()
        with throughput.excluded():  # eval time is not training time
          self._eval(step, state["params"], setup, eval_batches, in_loop)
      if _due(step, cfg.checkpoint_every, p.end):  # stage ends always: resume at a boundary
        _save(self.ckpt, self.pending, step, state, data, self.config, record,
              force=step == p.end)
    return state, step

  def _eval(self, step: int, params, setup: Setup, eval_batches, in_loop) -> None:
    self.summary["eval"] = evaluate(setup.eval_step, params, eval_batches)
    probe_scalars, images = in_loop(params)
    self.summary["eval"].update(probe_scalars)
    self.writer.write(step, self.summary["eval"])
    self.writer.write_images(step, images)


def _due(step: int, every: int, last: int) -> bool:
  return step % every == 0 or step == last


def _describe(workdir: str, setup: Setup, config: str, start: int) -> None:
  """Process 0 records the operative gin config and prints how the model is sharded.

  DIR/config.gin is the newest run's config; DIR/config.<start>.gin keeps each (re)start's, so
  the config that wrote every checkpoint stays on record (each checkpoint also holds its own).
  """
  if jax.process_index() != 0:
    return
  root = paths.resolve(workdir)
  for name in ("config.gin", _unused(root, f"config.{start}", ".gin", config)):
    (root / name).write_text(config)
  print(sharding.describe(setup.abstract_params, setup.mesh, setup.rules))
  if setup.sequence is not None:
    seq = setup.sequence
    print(f"sequence parallel: {seq.shards} shards over '{seq.seq_axis}', layout "
          f"{seq.layout!r}, attention {seq.config.attention!r}")


def _unused(root, stem: str, suffix: str, content: str) -> str:
  """`stem + suffix`, or `stem.<n> + suffix` when a file of that name in `root` (an
  epath.Path) holds something else."""
  name, n = stem + suffix, 1
  while (root / name).exists():
    if (root / name).read_text() == content:
      break
    name, n = f"{stem}.{n}{suffix}", n + 1
  return name


def _restore_or_init(run: Run, setup: Setup, ckpt: Checkpointer,
                     config: str) -> tuple[dict, int, tuple[int, bytes] | None]:
  """(state, step, (stage index, data state) or None): the newest checkpoint's, else one from
  TrainConfig.init_from, else fresh. This run's own checkpoint takes precedence over init_from:
  once a run initialised from another has saved, running it again resumes it."""
  try:
    restored = ckpt.restore_latest(setup.abstract_state(), config,
                                   fallback=run.train.on_corrupt_checkpoint == "fallback")
  except CheckpointMismatchError:
    _refuse_imported(ckpt)  # the likely cause, said plainly
    raise
  if restored is None:
    fresh = train_state.init_state(run.model, run.train.seed, setup.optimizer, setup.shardings)
    if run.train.init_from is None:
      return fresh, 0, None
    return init_from.initial_state(run.train, setup, fresh, config), 0, None
  state, data_state, start = restored
  record = ckpt.record_of(start) or {}  # its files are verified by now
  if run.train.stages or record.get("stages"):
    stages.check_resumable(record.get("stages"), run.train.stages, start, ckpt.directory)
  else:
    _check_same_length(ckpt, start, config)
  if run.train.init_from is not None:
    print(f"TrainConfig.init_from = {run.train.init_from!r} is ignored: this workdir has "
          "checkpoints of its own, and resuming them takes precedence.")
  print(f"Resumed from {ckpt.directory}/{start}")
  return state, start, (record.get("stage", 0), data_state)


def _refuse_imported(ckpt: Checkpointer) -> None:
  """ConfigError when the newest checkpoint was written by `lcjax.convert import` (params
  only: nothing to resume)."""
  latest = ckpt.latest_step()
  record = (ckpt.record_of(latest) or {}) if latest is not None else {}
  if record.get("params_only"):
    raise ConfigError(
        f"{ckpt.workdir} holds a checkpoint imported by lcjax.convert from "
        f"{record.get('imported_from')} (parameters only: no optimizer state or data position "
        f"to resume); nothing was changed. Train in a new --workdir with TrainConfig.init_from "
        f"= {ckpt.workdir!r} (its model.gin sets it).")


def _check_same_length(ckpt: Checkpointer, step: int, config: str) -> None:
  """The learning-rate schedule is a function of TrainConfig.steps: resuming with another value
  would silently change the learning rate from the resumed step on."""
  saved = ckpt.config_of(step)
  if saved is None:
    return
  changed = [c for c in binding_changes(saved, config) if c.startswith("TrainConfig.steps:")]
  if changed:
    raise ConfigError(
        f"{changed[0]} since checkpoint step {step} in {ckpt.directory} was written: the "
        "learning-rate schedule spans TrainConfig.steps, so resuming would change the learning "
        "rate from that step on. Set TrainConfig.steps back to resume this run; to train with "
        "another schedule, start a new run with a new --workdir.")


def _jit_train_step(setup: Setup, accum_steps: int):
  step = make_train_step(setup.graphdef, setup.optimizer, setup.schedule, accum_steps)
  return jax.jit(step, in_shardings=(setup.shardings, setup.batch_sharding),
                 out_shardings=(setup.shardings, setup.replicated), donate_argnums=0)


def _progress(workdir: str, cfg: TrainConfig, start: int, config: str,
              cleanup: contextlib.ExitStack):
  """(metrics writer, progress bar), both silent off process 0, closed with `cleanup`."""
  is_main = jax.process_index() == 0
  wandb = WandbLog(cfg.wandb_project, workdir, config) if is_main and cfg.wandb_project else None
  writer = cleanup.enter_context(contextlib.closing(
      MetricsWriter(workdir, start=start, enabled=is_main, wandb=wandb)))
  bar = cleanup.enter_context(tqdm.tqdm(total=cfg.steps, initial=start, disable=not is_main,
                                        dynamic_ncols=True, mininterval=1.0))
  return writer, bar


def _throughput(run: Run) -> Throughput:
  cfg, seq_len = run.train, run.data.sequence_length
  peak = cfg.peak_flops_per_device or flops.peak_flops(jax.devices()[0].device_kind)
  return Throughput(cfg.batch_size * seq_len, flops.train_flops_per_token(run.model, seq_len),
                    peak * jax.device_count() if peak else None)


def _summary(workdir: str, ckpt: Checkpointer) -> dict:
  root = paths.resolve(workdir)
  return {"workdir": str(root), "checkpoints": ckpt.directory, "tensorboard": str(root / "tb"),
          "metrics": str(root / "metrics.jsonl"), "preempted": False, "train": {}, "eval": {}}


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
  non-finite loss, gradient norm or updated-parameter norm.

  Step s's loss is computed from the parameters checkpointed at s - 1, so a checkpoint is good
  only once the step computed from it was finite: a non-finite step s condemns the checkpoints
  from s - 1 on (they hold the updates that led to it). They are set aside, not deleted, so that
  running again resumes from the newest good one. The checkpoint this run resumed from is never
  set aside: its next step was finite when it was first run, so a failure right after resuming
  comes from what changed since (the configuration), and rerunning must not walk back through
  every checkpoint.
  """

  def __init__(self, ckpt: Checkpointer, run: Run, start: int):
    self._ckpt, self._optim, self._start, self._items = ckpt, run.optim, start, []

  def add(self, step: int, metrics: dict) -> None:
    self._items.append((step, metrics))

  def drain(self) -> list[tuple[int, dict]]:
    fetched = [(s, jax.device_get(m)) for s, m in self._items]
    self._items.clear()
    for s, m in fetched:
      values = {k: float(m[k]) for k in ("loss", "grad_norm", "param_norm")}
      if not all(math.isfinite(v) for v in values.values()):
        self._diverged(s, values)
    return fetched

  def _diverged(self, step: int, values: dict) -> None:
    # Only the update overflowed: the parameters step s started from gave a finite loss.
    first_bad = step if math.isfinite(values["loss"] + values["grad_norm"]) else step - 1
    self._ckpt.wait()
    poisoned = [c for c in self._ckpt.all_steps() if c >= first_bad and c > self._start]
    moved = [self._ckpt.quarantine(c, "diverged") for c in poisoned]
    good = self._ckpt.latest_step()
    shown = ", ".join(f"{k}={v:.3g}" for k, v in values.items())
    aside = (f" Checkpoint(s) {poisoned} hold the updates that led to it; they were moved to "
             f"{', '.join(moved)}." if poisoned else "")
    resume = (f"The newest good checkpoint is step {good} in {self._ckpt.directory}; running the "
              "same command again resumes from it." if good is not None else
              "No good checkpoint exists; running the same command again starts from step 0.")
    raise NonFiniteLossError(
        f"Training diverged at step {step} ({shown}).{aside} {resume} First lower "
        f"OptimConfig.peak_learning_rate (now {self._optim.peak_learning_rate:g}), raise "
        f"OptimConfig.warmup_steps (now {self._optim.warmup_steps}), or check the data.")


def _log(step: int, fetched: list, throughput: Throughput, writer: MetricsWriter, bar,
         p: stages.Planned) -> dict:
  """Writes the newest step's metrics with the throughput since the last log (within stage
  `p`: the log is due at each stage's end) and the stage."""
  _, metrics = fetched[-1]
  logged = {k: float(v) for k, v in metrics.items() if k != "loss_tokens"}
  logged.update(throughput.report())
  logged.update(device_memory())
  logged.update(stage=p.index, sequence_length=p.run.data.sequence_length)
  writer.write(step, logged)
  bar.set_postfix(loss=f"{logged['loss']:.3f}", lr=f"{logged['lr']:.1e}")
  return {"step": step, **logged}


def _save(ckpt: Checkpointer, pending: _PendingMetrics, step: int, state, data, config: str,
          record: dict, force: bool) -> None:
  """Checkpoints `step` when due (or `force`), once its metrics are known to be finite."""
  pending.drain()
  ckpt.save(step, state, data.state(), config, force=force, record=record)


def _preempt(ckpt: Checkpointer, pending: _PendingMetrics, step: int, state, data,
             config: str, record: dict) -> None:
  """Saves `step` (if the interval did not just save it) and waits until it is on disk."""
  _save(ckpt, pending, step, state, data, config, record, force=True)
  ckpt.wait()
  print(f"\nSIGTERM: checkpoint step {step} is saved in {ckpt.directory}; exiting. Run the "
        "same command again to resume from it.")
