"""Running a sweep: cell states from their status files, "done" meaning trained to the end,
and a live tiny sweep (one cell diverges) that resumes, reports its status and its results."""

import csv
import json
import os
import subprocess
import sys

import pytest

from lcjax.sweep import commands, runner, status
from lcjax.sweep import grid as grids
from lcjax.sweep.placement import placement
from tests.train.runs import TINY, read_jsonl

QUIET = dict(say=lambda _: None)


def test_states_from_status_files(tmp_path):
  assert status.state_of(tmp_path, "a") == ("pending", {})
  status.write_status(tmp_path, "a", state="running", pid=os.getpid())
  assert status.state_of(tmp_path, "a")[0] == "running"
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  status.write_status(tmp_path, "b", state="running", pid=gone.pid)
  state, record = status.state_of(tmp_path, "b")
  assert state == "failed" and record["error"].startswith(f"interrupted: process {gone.pid}")
  status.write_status(tmp_path, "c", state="done", exit_code=0)
  assert status.state_of(tmp_path, "c")[0] == "done"
  assert sorted(os.listdir(tmp_path / "a")) == [status.STATUS]  # no temporary file left


def test_last_error_line():
  log = "step 1\r 10%|#  | loss=3\nTraceback (most recent call last):\n  x\nValueError: bad\n" \
        "done.\n"
  assert status.last_error_line(log) == "ValueError: bad"
  assert status.last_error_line("one\ntwo\n") == "two"
  assert status.last_error_line("") == ""


def test_exit_0_short_of_the_steps_is_not_done(tmp_path, monkeypatch):
  # lcjax.train exits 0 when preempted: done means the metrics reached TrainConfig.steps.
  monkeypatch.setattr(runner, "commands", lambda *a, **k: [[sys.executable, "-c", "pass"]])
  cell = grids.Cell(0, "c", {}, ())
  grid = {"gin_files": [], "eval": None}
  state = runner.run_cell(grid, cell, tmp_path, 5, placement("cpu", 1, 1, 0))
  record = status.read_status(tmp_path, "c")
  assert state == "failed" and record["exit_code"] == 0
  assert record["error"].startswith("stopped at step 0 of 5")
  assert "$ " in (tmp_path / "c" / status.LOG).read_text()


def _grid_file(tmp_path):
  bindings = TINY + ["TrainConfig.steps = 3", "TrainConfig.checkpoint_every = 3",
                     "TrainConfig.eval_every = 3", "EvalConfig.suite = ()"]
  path = tmp_path / "grid.py"
  # A learning rate of 1e30 passes validation and diverges at run time (NonFiniteLossError).
  path.write_text(
      "import ml_collections\n\n\ndef get_config():\n  c = ml_collections.ConfigDict()\n"
      f"  c.gin_files = ['configs/demo.gin']\n  c.bindings = {bindings!r}\n"
      "  c.axes = [('OptimConfig.peak_learning_rate', [1e-3, 1e30, 2e-3])]\n"
      "  c.eval = True\n  return c\n")
  return str(path)


@pytest.mark.slow
def test_live_sweep_fails_one_cell_resumes_and_reports(tmp_path):
  grid, root = _grid_file(tmp_path), str(tmp_path / "sweep")
  good, bad, other = ("peak_learning_rate=0.001", "peak_learning_rate=1e30",
                      "peak_learning_rate=0.002")
  states = commands.run(grid, root, parallel=2, backend="cpu", **QUIET)
  assert states == {good: "done", bad: "failed", other: "done"}
  for name in (good, other):  # trained and evaluated
    assert os.path.isfile(os.path.join(root, name, "eval", "3", "results.json"))

  rows = {r["cell"]: r for r in commands.status_rows(grid, root)}
  assert [rows[n]["state"] for n in (good, bad, other)] == ["done", "failed", "done"]
  assert rows[good]["step"] == 3 and rows[good]["exit"] == 0
  assert rows[bad]["exit"] == 1 and "diverged" in rows[bad]["error"]
  table = commands.status_table(commands.status_rows(grid, root))
  assert "2 done, 0 running, 1 failed, 0 pending" in table

  # Rerun: the done cells are skipped, the failed one is tried again (and fails again).
  said = []
  assert commands.run(grid, root, parallel=2, backend="cpu", say=said.append)[bad] == "failed"
  assert f"skip   {good} (done)" in said and f"skip   {other} (done)" in said
  log = lambda n: open(os.path.join(root, n, status.LOG)).read()  # noqa: E731
  assert log(bad).count("-m lcjax.train") == 2 and log(good).count("-m lcjax.train") == 1

  written = commands.make_report(grid, root)
  assert [os.path.basename(p) for p in written] == [
      "results.csv", "report.md", "loss_by_peak_learning_rate.png", "train_loss.png"]
  with open(os.path.join(root, "results.csv")) as f:
    table = list(csv.DictReader(f))
  assert [r["cell"] for r in table] == [good, bad, other]
  assert [r["peak_learning_rate"] for r in table] == ["0.001", "1e+30", "0.002"]
  assert float(table[0]["loss"]) > 0 and table[1]["state"] == "failed"
  assert "eval/lcjax_passkey/loss" in table[0]
  report = open(os.path.join(root, "report.md")).read()
  assert report.count(f"| {good} | 0.001 | done | 3 |") == 1
  for png in written[2:]:
    assert open(png, "rb").read(4) == b"\x89PNG"


@pytest.mark.slow
def test_live_sweep_with_a_base_trains_it_once_and_starts_every_cell_from_it(tmp_path):
  bindings = TINY + ["AttentionConfig.position_encoding = 'rope'",
                     "TrainConfig.steps = 2", "TrainConfig.checkpoint_every = 2",
                     "TrainConfig.eval_every = 2", "EvalConfig.suite = ()"]
  path = tmp_path / "grid.py"
  path.write_text(
      "import ml_collections\n\n\ndef get_config():\n  c = ml_collections.ConfigDict()\n"
      f"  c.gin_files = ['configs/demo.gin']\n  c.bindings = {bindings!r}\n  c.base = []\n"
      "  c.axes = [('method', {'zero_shot': ['EvalConfig.attention = {\"rope_theta\": 1e6}'],\n"
      "                        'tuned': ['TrainConfig.steps = 1',\n"
      "                                  'AttentionConfig.rope_theta = 1e6']})]\n"
      "  c.eval = True\n  return c\n")
  grid, root = str(path), tmp_path / "sweep"
  said = []
  states = commands.run(grid, str(root), parallel=2, backend="cpu", say=said.append)
  assert states == {"base": "done", "method=zero_shot": "done", "method=tuned": "done"}, said
  assert not (root / "base" / "eval").exists()  # the base is trained, not evaluated
  # The zero-shot cell trained nothing: it evaluated the base's checkpoint its own way.
  zero_shot = root / "method=zero_shot"
  assert not (zero_shot / "checkpoints").exists()
  results = json.loads((zero_shot / "eval" / "2" / "results.json").read_text())
  assert results["checkpoint"] == f"{root}/base/checkpoints/2"
  assert results["attention_overrides"] == {"rope_theta": 1e6}
  # The tuned cell trained its own step from the base's parameters.
  log = (root / "method=tuned" / status.LOG).read_text()
  assert f"Initialised from {root}/base/checkpoints/2 (params)" in log
  assert (root / "method=tuned" / "eval" / "1" / "results.json").exists()

  rows = {r["cell"]: r for r in commands.status_rows(grid, str(root))}
  assert rows["base"]["state"] == "done" and rows["base"]["step"] == 2

  said = []  # a rerun has nothing to do, the base included
  commands.run(grid, str(root), parallel=2, backend="cpu", say=said.append)
  assert "skip   method=zero_shot (done)" in said and not any("start" in s for s in said)

  out = tmp_path / "report"
  commands.make_report(grid, str(root), out=str(out))
  with open(out / "results.csv") as f:
    table = {r["cell"]: r for r in csv.DictReader(f)}
  base_loss = [r["loss"] for r in read_jsonl(root / "base" / "metrics.jsonl") if "loss" in r]
  # The zero-shot row shows the base's training; the tuned row counts the base's steps too.
  assert table["method=zero_shot"]["step"] == "2"
  assert float(table["method=zero_shot"]["loss"]) == pytest.approx(base_loss[-1], rel=1e-3)
  assert table["method=tuned"]["step"] == "3"
