"""Step metrics beyond the loss: device memory on accelerators, and the optional wandb copy
(run in wandb's offline mode: nothing leaves the machine)."""

import sys

import pytest

from lcjax.errors import ConfigError
from lcjax.train.memory import GIB, device_memory
from lcjax.train.wandb_log import WandbLog, run_id
from tests.train.runs import bindings, read_jsonl, train_in_process


class FakeDevice:
  def __init__(self, id, stats):
    self.id, self._stats = id, stats

  def memory_stats(self):
    return self._stats


def test_device_memory_reports_each_devices_counters_in_gib():
  devices = [FakeDevice(0, {"bytes_in_use": GIB, "peak_bytes_in_use": 3 * GIB, "x": 1}),
             FakeDevice(5, {"bytes_in_use": GIB // 2, "peak_bytes_in_use": GIB})]
  assert device_memory(devices) == {
      "memory_in_use_gib/0": 1.0, "memory_peak_gib/0": 3.0,
      "memory_in_use_gib/5": 0.5, "memory_peak_gib/5": 1.0}


def test_device_memory_is_omitted_where_the_backend_keeps_no_counters():
  assert device_memory() == {}  # CPU: memory_stats() is None
  assert device_memory([FakeDevice(0, None), FakeDevice(1, {})]) == {}


def test_wandb_offline_run_gets_the_step_metrics_and_the_gin_config(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.chdir(tmp_path)
  workdir = tmp_path / "run"
  train_in_process(workdir, bindings(TrainConfig__steps=3, TrainConfig__eval_every=3,
                                     TrainConfig__checkpoint_every=3,
                                     TrainConfig__wandb_project="lcjax-test"))
  rows = read_jsonl(workdir / "metrics.jsonl")
  assert not any(k.startswith("memory_") for r in rows for k in r)  # CPU: no memory counters
  # One offline run, its id derived from the workdir; the records hold metrics and bindings.
  logs = list((workdir / "wandb").glob(f"offline-run-*-{run_id(str(workdir))}/run-*.wandb"))
  assert len(logs) == 1, list((workdir / "wandb").iterdir())
  record = logs[0].read_bytes()
  for key in (b"loss", b"grad_norm", b"tokens_per_sec", b"eval/lcjax_passkey/exact_match",
              b"ModelConfig.d_model", b"TrainConfig.steps"):
    assert key in record, key
  assert not (tmp_path / "wandb").exists()  # wandb's files stay in the workdir


def test_wandb_project_without_wandb_installed_names_the_fix(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
  with pytest.raises(ConfigError, match="pip install wandb"):
    WandbLog("p", str(tmp_path), "")
