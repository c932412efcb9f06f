"""Where metrics go: one JSON object per line in DIR/metrics.jsonl and TensorBoard under DIR/tb."""

import contextlib
import io
import json
import math
import time

import tensorboardX
from etils import epath
from tensorboardX import record_writer

from lcjax import paths


class MetricsWriter:
  """Writes scalar metrics; a no-op on processes other than 0 (multi-host).

  A run resumed at `start` replays the steps after it, so the lines logged past `start` by the
  interrupted run are dropped first (metrics.jsonl keeps one object per logged step), and the
  new TensorBoard event file starts with a purge marker at `start + 1`: TensorBoard hides the
  older files' events from that step on.
  """

  def __init__(self, workdir: str, start: int = 0, enabled: bool = True, wandb=None):
    self.enabled, self._wandb = enabled, wandb  # wandb: a WandbLog that gets the same scalars
    if enabled:
      root = paths.resolve(workdir)
      self._jsonl = paths.LineLog(root / "metrics.jsonl", keep=lambda line: _kept(line, start))
      _tensorboard_through_epath()
      self._tb = tensorboardX.SummaryWriter(str(root / "tb"), purge_step=start + 1)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
             for k, v in metrics.items()}
    self._jsonl.append(json.dumps({"step": step, **clean}) + "\n")
    for key, value in clean.items():
      if value is not None:
        self._tb.add_scalar(key, value, step)
    self._tb.flush()
    if self._wandb is not None:
      self._wandb.write(step, clean)

  def write_images(self, step: int, images: dict) -> None:
    """{tag: uint8 `[height, width, 3]`} to TensorBoard (the eval heatmaps)."""
    if not self.enabled or not images:
      return
    for tag, image in images.items():
      self._tb.add_image(tag, image, step, dataformats="HWC")
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
    if self._wandb is not None:
      self._wandb.close()


def _kept(line: str, step: int) -> bool:
  """Whether a resumed run at `step` keeps this line of the log: not one past `step`, nor a
  last line a kill cut short."""
  return line.endswith("\n") and bool(line.strip()) and json.loads(line)["step"] <= step


def read_metrics(workdir: str) -> list[dict]:
  """The metrics log as a list of dicts, one per logged step (eval results on their own line);
  empty when there is none yet. A last line still being written (a run in progress) is left
  out."""
  path = paths.resolve(workdir) / "metrics.jsonl"
  lines = path.read_text().splitlines(keepends=True) if path.exists() else []
  return [json.loads(line) for line in lines if line.endswith("\n") and line.strip()]


class _EpathRecordFile:
  """An event file on an object store: the bytes so far, uploaded whole at each flush (an
  object cannot be appended to)."""

  def __init__(self, path: str):
    self.path, self._buffer = epath.Path(path), io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    self.path.write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathRecordFactory:
  def open(self, path: str) -> _EpathRecordFile:
    return _EpathRecordFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _tensorboard_through_epath() -> None:
  """tensorboardX's own gs:// and s3:// writers need google-cloud-storage / boto3 (not lcjax
  dependencies); event files on every remote scheme go through epath instead."""
  for scheme in ("gs", "s3", "az"):
    if not isinstance(record_writer.REGISTERED_FACTORIES.get(scheme), _EpathRecordFactory):
      record_writer.register_writer_factory(scheme, _EpathRecordFactory())


class Throughput:
  """Training throughput since the last `report`: tokens/s, seconds per step and MFU.

  Counts the steps taken (`step`) and the time they took; time spent inside `excluded()`
  (evaluation) is not training time.
  """

  def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float | None,
               clock=time.perf_counter):
    self.tokens_per_step, self.flops_per_token, self.peak_flops = (
        tokens_per_step, flops_per_token, peak_flops)  # peak: all devices together
    self._clock = clock
    self._start, self._steps, self._excluded = clock(), 0, 0.0

  def step(self) -> None:
    self._steps += 1

  @contextlib.contextmanager
  def excluded(self):
    began = self._clock()
    try:
      yield
    finally:
      self._excluded += self._clock() - began

  def report(self) -> dict:
    elapsed = self._clock() - self._start - self._excluded
    tokens_per_sec = self._steps * self.tokens_per_step / elapsed
    result = dict(
        tokens_per_sec=tokens_per_sec, step_time=elapsed / self._steps,
        mfu=self.flops_per_token * tokens_per_sec / self.peak_flops if self.peak_flops else None)
    self._start, self._steps, self._excluded = self._clock(), 0, 0.0
    return result
