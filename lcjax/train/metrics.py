"""Where metrics go: one JSON object per line in DIR/metrics.jsonl and TensorBoard under DIR/tb."""

import json
import math
import os

import tensorboardX


class MetricsWriter:
  """Writes scalar metrics; a no-op on processes other than 0 (multi-host)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
             for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    self._jsonl.flush()
    for key, value in clean.items():
      if value is not None:
        self._tb.add_scalar(key, value, step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The metrics log as a list of dicts (later lines for the same step win in `by_step`)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
