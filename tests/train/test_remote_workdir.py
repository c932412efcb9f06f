"""Work dirs on object stores (gs://): every file a run writes or reads goes through epath.

`etils.epath.testing.mock_epath` maps gs://bucket onto a local directory. orbax writes its
arrays with tensorstore, which would try the real GCS: only the Checkpointer's orbax directory
(`checkpoint.orbax_path`) is mapped onto that same local directory; every other file goes
through the mocked gs:// path. The runs start in an empty working directory, which must stay
empty: an `os` call on a gs:// string creates ./gs:/... there.
"""

import contextlib
import json
import os

import gin
import pytest
from etils import epath
from etils.epath import gpath as epath_gpath
from etils.epath import testing as epath_testing

from lcjax import paths
from lcjax.config import parse_gin
from lcjax.errors import WorkdirError
from lcjax.train import checkpoint
from lcjax.workdir import existing_workdir, prepare_workdir
from tests.train.runs import DEMO_GIN, bindings, train_in_process

BUCKET = "gs://bucket"
SMALL_SUITE = ["NiahGrid.depths = (0.0,)", "NiahGrid.samples = 1",
               "NiahGrid.lengths = (128,)", "PplByPosition.documents = 1",
               "PplByPosition.lengths = (128,)"]


@contextlib.contextmanager
def gs_on(local, monkeypatch, opened=None):
  """gs://bucket/... is `local`/... for epath (and orbax); `opened` collects (path, mode)."""
  def to_local(p):
    p = os.fspath(p)
    return str(local) + p[len(BUCKET):] if p.startswith(BUCKET) else p

  def to_remote(p):
    p = os.fspath(p)
    return BUCKET + p[len(str(local)):] if p.startswith(str(local)) else p

  def one(fn, path, *args, **kwargs):
    return fn(to_local(path), *args, **kwargs)

  def two(fn, src, dst, **kwargs):
    return fn(to_local(src), to_local(dst), **kwargs)

  def open_(fn, path, mode):
    if opened is not None:
      opened.append((os.fspath(path), mode))
    return fn(to_local(path), mode)

  def glob(fn, pattern):  # results named as the pattern was (orbax globs its local paths)
    back = to_remote if os.fspath(pattern).startswith(BUCKET) else os.fspath
    return [back(p) for p in fn(to_local(pattern))]

  def walk(fn, top, **kwargs):
    back = to_remote if os.fspath(top).startswith(BUCKET) else os.fspath
    for root, dirs, files in fn(to_local(top), **kwargs):
      yield back(root), dirs, files

  # epath picks TensorFlow's gfile for gs:// when TensorFlow is installed, bypassing the mock;
  # it decides once per process (cached), so EPATH_USE_TF=false is too late after other tests.
  monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setattr(checkpoint, "orbax_path", lambda p: epath.Path(to_local(p)))
  fns = {name: one for name in ("exists", "isdir", "listdir", "makedirs", "mkdir", "remove",
                                "rmtree", "stat")}
  with epath_testing.mock_epath(**fns, open=open_, glob=glob, walk=walk, rename=two,
                                replace=two, copy=two):
    yield


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """(the local directory behind gs://bucket, the list of (path, mode) opened), with the
  working directory an empty one checked to stay empty."""
  local, cwd, opened = tmp_path / "bucket", tmp_path / "cwd", []
  local.mkdir()
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  with gs_on(local, monkeypatch, opened):
    yield local, opened
  assert os.listdir(cwd) == []  # nothing named gs: (nor anything else) was created here


def _steps(local) -> list[int]:
  lines = (local / "run" / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


@pytest.mark.slow
def test_train_resume_and_eval_on_a_gs_workdir(bucket):
  local, opened = bucket
  run = f"{BUCKET}/run"
  b = bindings(TrainConfig__steps=6, TrainConfig__eval_every=6, TrainConfig__checkpoint_every=4)
  summary = train_in_process(run, b)
  assert summary["workdir"] == run and summary["metrics"] == f"{run}/metrics.jsonl"
  root = local / "run"
  assert _steps(local) == [1, 2, 3, 4, 5, 6]
  assert (root / "config.gin").read_text() == (root / "config.0.gin").read_text()
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(root / "tb"))
  assert sorted(os.listdir(root / "checkpoints")) == ["4", "6"]
  assert (root / "checkpoints" / "6" / "lcjax.sha256.json").exists()
  # Object stores cannot append: the log is rewritten whole (one object write) each time.
  assert (f"{run}/metrics.jsonl", "a") not in opened
  assert (f"{run}/metrics.jsonl", "w") in opened

  # As if killed after step 6 was logged but before its checkpoint: resume from step 4.
  epath.Path(f"{run}/checkpoints/6").rmtree()
  train_in_process(run, b)
  assert _steps(local) == [1, 2, 3, 4, 5, 6]  # steps 5-6 replaced, not repeated
  assert (root / "config.4.gin").exists()

  gin.clear_config()
  try:
    parse_gin([DEMO_GIN], b + SMALL_SUITE)
    from lcjax.eval.__main__ import evaluate_checkpoint
    results = evaluate_checkpoint(run)
  finally:
    gin.clear_config()
  out = root / "eval" / "6"
  assert results["step"] == 6 and results["checkpoint"] == f"{run}/checkpoints/6"
  assert json.loads((out / "results.json").read_text())["step"] == 6
  for name in ("niah_grid", "ppl_by_position"):
    assert (out / f"{name}.csv").exists()
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (out / "report.md").exists()
  assert all(p.startswith(f"{run}/eval/6/") for p in results["written"])


@pytest.mark.parametrize("remote", [False, True])
def test_line_log_appends_locally_and_rewrites_remotely(bucket, tmp_path, remote):
  local, opened = bucket
  path = epath.Path(f"{BUCKET}/log.jsonl" if remote else str(tmp_path / "log.jsonl"))
  on_disk = local / "log.jsonl" if remote else tmp_path / "log.jsonl"
  on_disk.write_text("1\n2\n3\n4")  # the last line was cut short by a kill
  log = paths.LineLog(path, keep=lambda line: line.endswith("\n") and int(line) <= 2)
  assert on_disk.read_text() == "1\n2\n"
  log.append("3\n")
  log.append("4\n")
  assert on_disk.read_text() == "1\n2\n3\n4\n"  # visible after each append, not only at close
  log.close()
  modes = [m for p, m in opened if p == str(path)]
  # Remote: whole writes, never an append. Locally only the read goes through epath; writes
  # are the OS's own (a rename over the file, appends).
  assert modes == (["r", "w", "w", "w"] if remote else ["r"])
  assert os.listdir(on_disk.parent).count("log.jsonl.tmp") == 0


def test_write_atomic_leaves_no_temporary_file(bucket, tmp_path):
  local, _ = bucket
  for path, on_disk in [(str(tmp_path / "m.json"), tmp_path / "m.json"),
                        (f"{BUCKET}/m.json", local / "m.json")]:
    paths.write_atomic(path, "old")
    paths.write_atomic(path, "new")
    assert on_disk.read_text() == "new"
    assert sorted(os.listdir(on_disk.parent)).count("m.json.tmp") == 0


def test_remote_paths_are_kept_as_given():
  assert paths.is_remote("gs://b/run") and paths.is_remote("s3://b/x")
  assert not paths.is_remote("/tmp/gs:/b") and not paths.is_remote("run")
  assert paths.absolute("gs://b/run") == "gs://b/run"
  assert paths.absolute("run") == os.path.join(os.getcwd(), "run")


def test_workdir_checks_on_gs(bucket):
  local, _ = bucket
  assert prepare_workdir(f"{BUCKET}/a/b") == f"{BUCKET}/a/b"
  assert os.listdir(local / "a" / "b") == []  # the write probe was deleted
  (local / "file").write_text("x")
  with pytest.raises(WorkdirError, match="is a file"):
    prepare_workdir(f"{BUCKET}/file")
  with pytest.raises(WorkdirError, match="does not exist"):
    existing_workdir(f"{BUCKET}/typo")
  with pytest.raises(WorkdirError, match="No checkpoint"):
    existing_workdir(f"{BUCKET}/a/b")
  (local / "a" / "b" / "checkpoints").mkdir()
  assert existing_workdir(f"{BUCKET}/a/b") == f"{BUCKET}/a/b"
