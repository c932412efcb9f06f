"""What a user sees when a command cannot run: one "Error:" paragraph on stderr naming the cause
(and the path or binding), no traceback, exit status 2 (the command must change), nothing
created; `--verbose` or LCJAX_TRACEBACK=1 adds the traceback and keeps the status.

Real CLI runs in fresh interpreters, all started together (each spends ~8 s importing), so the
file costs a few runs' time.
"""

import concurrent.futures
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.train.runs import DEMO_GIN, REPO

GIN = f"--gin_file={DEMO_GIN}"


def _run(cli: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", cli, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600)


def _read_only_dir(path) -> str | None:
  """A directory no file can be created in, or None when this user cannot make one. Permission
  bits do not bind root (tests run as root here), so root makes it immutable (chattr +i)."""
  os.makedirs(path)
  os.chmod(path, 0o555)
  if _writable(path):
    subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
  return None if _writable(path) else str(path)


def _writable(path) -> bool:
  try:
    with open(os.path.join(path, "probe"), "w"):
      pass
  except OSError:
    return False
  os.remove(os.path.join(path, "probe"))
  return True


def _workdir_with_a_checkpoint(workdir: str, step: int) -> str:
  """A workdir holding one checkpoint (a stand-in state: eval fails on the step it asks for
  before it restores anything)."""
  from lcjax.train.checkpoint import Checkpointer
  ckpt = Checkpointer(workdir, every=1, keep=3, async_save=False)
  ckpt.save(step, {"x": np.zeros(2, np.float32)}, b"iterator", "", force=True)
  ckpt.close()
  return workdir


@pytest.fixture(scope="module")
def case(tmp_path_factory):
  """{case name: (CompletedProcess, the workdir it was given)} of every run below."""
  root = tmp_path_factory.mktemp("cli_errors")
  a_file = root / "a_file"
  a_file.write_text("not a directory")
  read_only = _read_only_dir(root / "read_only")
  trained = _workdir_with_a_checkpoint(str(root / "trained"), step=3)
  fresh = lambda name: str(root / name)  # a workdir that must still not exist afterwards
  cases = {
      "misspelt": ("lcjax.train", fresh("misspelt"), ["--gin_bindings=ModelConfg.d_model = 64"]),
      "wrong_type": ("lcjax.train", fresh("wrong_type"),
                     ["--gin_bindings=TrainConfig.steps = 'x'"]),
      "wrong_type_verbose": ("lcjax.train", fresh("wrong_type_verbose"),
                             ["--gin_bindings=TrainConfig.steps = 'x'", "--verbose"]),
      "missing_gin_file": ("lcjax.train", fresh("missing_gin_file"),
                           ["--gin_file=configs/no_such.gin"]),
      "sequence_length_0": ("lcjax.train", fresh("sequence_length_0"),
                            ["--gin_bindings=DataConfig.sequence_length = 0"]),
      "impossible_mesh": ("lcjax.train", fresh("impossible_mesh"),
                          ["--gin_bindings=MeshConfig.data = 3"]),
      "workdir_is_a_file": ("lcjax.train", str(a_file), []),
      "eval_mistyped_workdir": ("lcjax.eval", fresh("mistyped"), []),
      "eval_missing_step": ("lcjax.eval", trained, ["--step=7"]),
      "stage_steps": ("lcjax.train", fresh("stage_steps"),
                      ["--gin_bindings=TrainConfig.stages = [@short/Stage()]",
                       "--gin_bindings=short/Stage.steps = 3"]),
      "init_from_missing": ("lcjax.train", fresh("init_from_missing"),
                            [f"--gin_bindings=TrainConfig.init_from = '{root}/no_such_run'"]),
  }
  if read_only is not None:
    cases["read_only_workdir"] = ("lcjax.train", read_only, [])
  def start(name):
    cli, workdir, extra = cases[name]
    gin = [] if any(a.startswith("--gin_file") for a in extra) else [GIN]
    return _run(cli, *gin, f"--workdir={workdir}", *extra)

  try:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # ~0.9 GB of memory each
      yield {name: (out, cases[name][1]) for name, out in zip(cases, pool.map(start, cases))}
  finally:
    if read_only is not None:
      subprocess.run(["chattr", "-i", read_only], capture_output=True, check=False)
      os.chmod(read_only, 0o755)


def _one_paragraph(out: subprocess.CompletedProcess, *expected: str) -> str:
  """The Error paragraph, after checking status 2, no traceback and that it names `expected`."""
  assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("Error: ")]
  assert len(errors) == 1, out.stderr[-3000:]
  for text in expected:
    assert text in errors[0], (text, errors[0])
  return errors[0]


@pytest.mark.parametrize("name, expected", [
    ("misspelt", ["ModelConfg", "No configurable matching"]),
    # gin re-raises a configurable's error with "In call to configurable ..." appended: the
    # error type (and so the status) survives.
    ("wrong_type", ["TrainConfig.steps = 'x'", "expected <class 'int'>"]),
    ("missing_gin_file", ["'configs/no_such.gin'", os.path.join(REPO, "configs", "no_such.gin"),
                          "search paths"]),
    ("sequence_length_0", ["DataConfig.sequence_length must be >= 1, got 0"]),
    ("eval_mistyped_workdir", ["does not exist", "nothing was created"]),
])
def test_bad_command_is_one_paragraph_and_creates_nothing(case, name, expected):
  out, workdir = case[name]
  _one_paragraph(out, *expected)
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("name, expected", [
    ("workdir_is_a_file", ["is a file, not a directory"]),
    ("read_only_workdir", ["cannot write in"]),
])
def test_unusable_workdir_is_one_paragraph(case, name, expected):
  if name not in case:
    pytest.skip("this user cannot make a read-only directory (neither chmod nor chattr +i)")
  out, workdir = case[name]
  _one_paragraph(out, workdir, *expected)


def test_impossible_mesh_is_one_paragraph(case):
  # Checked when the run is built on the devices, after the workdir was prepared.
  _one_paragraph(case["impossible_mesh"][0], "multiply to 3 devices but 8 are available")


def test_eval_of_a_missing_step_lists_the_available_ones(case):
  out, workdir = case["eval_missing_step"]
  _one_paragraph(out, "No checkpoint at step 7", "available steps: [3]", "Choose --step")
  assert sorted(os.listdir(workdir)) == ["checkpoints"]  # no eval/ results


def test_stage_steps_that_do_not_add_up_are_one_paragraph(case):
  out, workdir = case["stage_steps"]
  _one_paragraph(out, "TrainConfig.steps = 600, but the stages sum to 3 steps",
                 "short/Stage.steps = 3", "Set TrainConfig.steps = 3")
  assert not os.path.exists(workdir)


def test_init_from_a_missing_run_is_one_paragraph(case):
  out, _ = case["init_from_missing"]
  _one_paragraph(out, "TrainConfig.init_from = ", "no_such_run does not exist", "DIR:STEP")


def test_verbose_adds_the_traceback_and_keeps_the_status(case):
  out, _ = case["wrong_type_verbose"]
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" in out.stderr
  assert out.stderr.rstrip().splitlines()[-1].startswith("Error: TrainConfig.steps")


# -- In-process: the reporting wrapper and the workdir checks themselves ----------------------


def _exit_of(main, capsys) -> tuple[int, str]:
  """(exit status, stderr) of what the CLIs run: `report_errors(main, argv)`."""
  from lcjax.cli import report_errors
  with pytest.raises(SystemExit) as exit_:
    report_errors(main, [])
  return exit_.value.code, capsys.readouterr().err


def _raises(error):
  def main(argv):
    del argv
    raise error
  return main


def test_exit_status_is_the_errors(capsys):
  from lcjax.errors import CheckpointCorruptError, ConfigError, NonFiniteLossError
  code, err = _exit_of(_raises(ConfigError("bad\n  binding")), capsys)
  assert (code, err) == (2, "Error: bad binding\n")
  for runtime in (NonFiniteLossError("diverged"), CheckpointCorruptError("damaged")):
    code, err = _exit_of(_raises(runtime), capsys)
    assert code == 1 and err.startswith("Error: ") and "Traceback" not in err


def test_lcjax_traceback_env_adds_the_traceback(monkeypatch, capsys):
  from lcjax.errors import ConfigError
  monkeypatch.setenv("LCJAX_TRACEBACK", "1")
  code, err = _exit_of(_raises(ConfigError("bad binding")), capsys)
  assert code == 2 and "Traceback" in err and err.endswith("Error: bad binding\n")


def test_other_exceptions_keep_their_traceback(capsys):
  with pytest.raises(KeyError):
    _exit_of(_raises(KeyError("a bug")), capsys)


def test_prepare_workdir(tmp_path):
  from lcjax.errors import WorkdirError
  from lcjax.workdir import prepare_workdir
  assert prepare_workdir(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
  assert os.listdir(tmp_path / "a" / "b") == []  # the write probe leaves nothing
  (tmp_path / "file").write_text("x")
  with pytest.raises(WorkdirError, match="is a file"):
    prepare_workdir(str(tmp_path / "file"))
  with pytest.raises(WorkdirError, match="cannot create .*Not a directory"):
    prepare_workdir(str(tmp_path / "file" / "run"))


def test_existing_workdir_creates_nothing(tmp_path):
  from lcjax.errors import WorkdirError
  from lcjax.workdir import existing_workdir
  with pytest.raises(WorkdirError, match="does not exist"):
    existing_workdir(str(tmp_path / "typo"))
  with pytest.raises(WorkdirError, match="No checkpoint"):
    existing_workdir(str(tmp_path))
  assert os.listdir(tmp_path) == []
  (tmp_path / "checkpoints").mkdir()
  assert existing_workdir(str(tmp_path)) == str(tmp_path)


def test_missing_included_gin_file_is_named(tmp_path):
  from lcjax.config import parse_gin
  from lcjax.errors import ConfigError
  (tmp_path / "exp.gin").write_text("include 'demo.gin'\ninclude 'base_typo.gin'\n")
  with pytest.raises(ConfigError, match=r"'base_typo.gin' \(included from .*exp.gin\)"):
    parse_gin([str(tmp_path / "exp.gin")], [])
  with pytest.raises(ConfigError, match=r"'/no/such.gin' \(--gin_file\) not found"):
    parse_gin(["/no/such.gin"], [])
