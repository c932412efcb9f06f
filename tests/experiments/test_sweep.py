"""Grids: every grid in experiments/ expands into valid runs; grid errors stop a sweep before
any cell starts, naming the cell and the binding; the README's sweep commands dry-run."""

import glob
import os
import re
import shlex
import signal
import sys
import time

import gin
import pytest

from lcjax.config import parse_gin
from lcjax.errors import ConfigError
from lcjax.launch.slurm import SlurmSettings
from lcjax.run import Run
from lcjax.sweep import commands, runner, status
from lcjax.sweep import grid as grids
from tests.train.runs import REPO

# A grid is a file with get_config() (experiments/ also holds scripts, e.g. demo_retrieval.py).
GRIDS = [g for g in glob.glob(os.path.join(REPO, "experiments", "*.py"))
         if "\ndef get_config(" in open(g).read()]
LR_X_PATTERN = os.path.join(REPO, "experiments", "lr_x_pattern.py")


def write_grid(tmp_path, axes, bindings=(), extra=""):
  path = tmp_path / "grid.py"
  path.write_text(
      "import ml_collections\n\n\ndef get_config():\n"
      "  c = ml_collections.ConfigDict()\n  c.gin_files = ['configs/demo.gin']\n"
      f"  c.bindings = {list(bindings)!r}\n  c.axes = {axes!r}\n{extra}  return c\n")
  return str(path)


def test_there_are_grids():
  assert GRIDS


@pytest.mark.parametrize("path", GRIDS, ids=os.path.basename)
def test_grid_cells_are_valid_runs(path):
  grid = grids.load_grid(path)
  cells = grids.expand(grid)
  expected = 1
  for _, values in grid.axes:
    expected *= len(values)
  assert len(cells) == expected == len({c.name for c in cells})
  steps = grids.validate(grid, cells, REPO)
  base = grids.base_cell(grid)
  assert set(steps) == {c.name for c in cells} | ({grids.BASE} if base else set())
  # 0 steps: a cell that only evaluates the grid's base.
  assert all(s > 0 or (base and name != grids.BASE) for name, s in steps.items())


def test_cell_values_reach_the_configs():
  grid = grids.load_grid(LR_X_PATTERN)
  cell = grids.expand(grid)[-1]
  gin.clear_config()
  try:
    parse_gin([os.path.join(REPO, f) for f in grid.gin_files], list(cell.bindings))
    run = Run.from_gin()
  finally:
    gin.clear_config()
  assert run.optim.peak_learning_rate == 1e-2 and run.model.pattern == "*-*-"
  assert run.train.seed == 1 and run.data.seed == 1  # the seed axis binds both seeds
  assert cell.name == "pattern=A-A-_peak_learning_rate=0.01_seed=1" and cell.index == 7


def test_expand_names_values_and_order(tmp_path):
  grid = grids.load_grid(write_grid(tmp_path, [("OptimConfig.peak_learning_rate", [0.1, 0.2]),
                                               ("seed", [3])], ["TrainConfig.steps = 5"]))
  cells = grids.expand(grid)
  assert [c.name for c in cells] == ["peak_learning_rate=0.1_seed=3",
                                     "peak_learning_rate=0.2_seed=3"]
  assert cells[1].bindings == ("TrainConfig.steps = 5", "OptimConfig.peak_learning_rate = 0.2",
                               "TrainConfig.seed = 3", "DataConfig.seed = 3")
  assert grids.select(cells, index=1) == [cells[1]]
  assert grids.select(cells, name=cells[0].name) == [cells[0]]
  with pytest.raises(ConfigError, match=r"No cell --cell_index=5 .* 0: peak_learning_rate=0.1"):
    grids.select(cells, index=5)


def test_a_variant_axis_binds_each_variants_own_bindings(tmp_path):
  variants = {"tiny": ["ModelConfig.d_model = 64", "MLPConfig.hidden_dim = 128"],
              "wide": ["ModelConfig.d_model = 128"]}
  grid = grids.load_grid(write_grid(tmp_path, [("model", variants), ("seed", [0])]))
  cells = grids.expand(grid)
  assert [c.name for c in cells] == ["model=tiny_seed=0", "model=wide_seed=0"]
  assert cells[0].values == {"model": "tiny", "seed": 0}
  assert cells[0].bindings == ("ModelConfig.d_model = 64", "MLPConfig.hidden_dim = 128",
                               "TrainConfig.seed = 0", "DataConfig.seed = 0")
  assert set(grids.validate(grid, cells, REPO)) == {c.name for c in cells}


@pytest.mark.parametrize("axes, bindings, message", [
    ([("OptimConfig.peak_learning_rate", [])], [],
     r"axis 'OptimConfig.peak_learning_rate' has no values"),
    ([("ModelConfig.pattern", ["*-", "*+-"])], [],
     r"cells 0 and 1 are both named 'pattern=A-'"),
    ([("OptimConfig.peak_learning_rate", [1e-3, 2e-3])], ["OptimConfig.no_such_field = 1"],
     r"cell 0 \(peak_learning_rate=0.001\) is not a valid run.*no_such_field"),
    # Only the second cell is wrong: its value is out of range.
    ([("TrainConfig.steps", [5, -1])], [],
     r"cell 1 \(steps=-1\) is not a valid run"),
])
def test_grid_errors_stop_the_sweep_before_any_cell_starts(tmp_path, axes, bindings, message):
  path = write_grid(tmp_path, axes, bindings)
  root = tmp_path / "root"
  with pytest.raises(ConfigError, match=message):
    commands.run(path, str(root), parallel=2, say=lambda _: None)
  assert not root.exists()  # nothing started


def test_an_unparsable_value_names_the_cell(tmp_path):
  path = write_grid(tmp_path, [("TrainConfig.steps", [5])], ["TrainConfig.steps = ("])
  with pytest.raises(ConfigError, match=r"cell 0 \(steps=5\) is not a valid run"):
    commands.run(path, str(tmp_path / "root"), dry_run=True, say=lambda _: None)


def test_cell_command_runs_one_cell_by_index():
  assert runner.cell_command("experiments/lr_x_pattern.py", "gs://b/sweep", "$SLURM_ARRAY_TASK_ID",
                             python="python") == [
      "python", "experiments/sweep.py", "run", "experiments/lr_x_pattern.py",
      "--root=gs://b/sweep", "--cell_index=$SLURM_ARRAY_TASK_ID"]


def test_dry_run_prints_train_and_eval_per_cell(tmp_path):
  printed = []
  commands.run(LR_X_PATTERN, str(tmp_path), dry_run=True, cell_index=2, say=printed.append)
  train, evaluate = map(shlex.split, printed)
  workdir = f"--workdir={tmp_path}/pattern=A-A-A-A-_peak_learning_rate=0.01_seed=0"
  assert train[1:4] == ["-m", "lcjax.train", workdir]
  assert evaluate[1:4] == ["-m", "lcjax.eval", workdir]
  assert evaluate[-1] == "--suite=ppl_by_position"
  assert "--gin_bindings=OptimConfig.peak_learning_rate = 0.01" in train


def _readme_sweep_commands() -> list[str]:
  text = open(os.path.join(REPO, "README.md")).read()
  section = text.split("\n## Sweeps\n", 1)[1].split("\n## ", 1)[0]
  return [c.strip() for c in re.findall(r"^ *python experiments/sweep.py .*$", section, re.M)]


def test_readme_run_commands_parse_and_dry_run(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  cli, found = _cli(), _readme_sweep_commands()
  assert {shlex.split(c)[2] for c in found} == {"run", "status", "report"}
  for command in _readme_sweep_commands():
    args = cli.parse(shlex.split(command)[2:])
    assert os.path.isfile(args.grid)
    if args.command == "run" and args.slurm:
      printed = []
      settings = SlurmSettings(gpus_per_node=args.gpus_per_node, time=args.time)
      commands.slurm_array(args.grid, args.root, settings, dry_run=True, say=printed.append)
      assert "--array=0-" in printed[0] and "--cell_index=" in printed[0]
    elif args.command == "run":
      printed = []
      commands.run(args.grid, str(tmp_path), args.parallel, True, args.cell, args.cell_index,
                   say=printed.append)
      assert printed and all("lcjax." in p for p in printed)


# The zero-shot cell's run is the base's only when it binds what the base's own bindings do.
BASE_GRID = dict(
    axes=[("method", {"zero_shot": ["EvalConfig.attention = {'rope_theta': 1e6}",
                                    "OptimConfig.warmup_steps = 1"],
                      "tuned": ["TrainConfig.steps = 1", "AttentionConfig.rope_theta = 1e6"]})],
    bindings=["TrainConfig.steps = 2"],
    extra="  c.base = ['OptimConfig.warmup_steps = 1']\n  c.eval = True\n")


def test_a_grid_with_a_base_trains_it_first_and_starts_every_cell_from_it(tmp_path):
  grid = grids.load_grid(write_grid(tmp_path, **BASE_GRID))
  cells = grids.expand(grid)
  base = grids.base_cell(grid)
  assert base.name == grids.BASE and base.bindings == ("TrainConfig.steps = 2",
                                                       "OptimConfig.warmup_steps = 1")
  # A cell whose run is the base's (only its evaluation differs) trains 0 steps.
  assert grids.validate(grid, cells, REPO) == {"base": 2, "method=zero_shot": 0,
                                               "method=tuned": 1}
  printed = []
  commands.run(str(tmp_path / "grid.py"), str(tmp_path / "root"), dry_run=True,
               say=printed.append)
  lines = [shlex.split(line) for line in printed]
  assert [line[2:4] for line in lines] == [
      ["lcjax.train", f"--workdir={tmp_path}/root/base"],
      ["lcjax.eval", f"--workdir={tmp_path}/root/method=zero_shot"],
      ["lcjax.train", f"--workdir={tmp_path}/root/method=tuned"],
      ["lcjax.eval", f"--workdir={tmp_path}/root/method=tuned"]]
  starts_from = f"--gin_bindings=TrainConfig.init_from = '{tmp_path}/root/base'"
  assert [starts_from in line for line in lines] == [False, True, True, True]
  assert "--gin_bindings=OptimConfig.warmup_steps = 1" in lines[0]


def test_a_grid_with_a_base_names_no_cell_base_and_its_array_waits_for_the_base(tmp_path):
  named_base = dict(BASE_GRID, axes=[])  # the one cell of a grid without axes is "base"
  with pytest.raises(ConfigError, match="named 'base', the directory of the grid's base run"):
    grids.expand(grids.load_grid(write_grid(tmp_path, **named_base)))
  path, root = write_grid(tmp_path, **BASE_GRID), str(tmp_path / "root")
  settings = SlurmSettings(job_name="b")
  with pytest.raises(ConfigError, match=re.escape(
      f"train it first with `python experiments/sweep.py run {path} --root={root} "
      "--cell=base`")):
    commands.slurm_array(path, root, settings, dry_run=True, say=lambda _: None)
  status.write_status(root, grids.BASE, state="done", exit_code=0)
  assert commands.slurm_array(path, root, settings, dry_run=True, say=lambda _: None) == 0
  status.write_status(root, grids.BASE, state="running", pid=1, host="other-node")
  with pytest.raises(ConfigError, match="base run .* is training .* rerun once it is done"):
    commands.run(path, root, backend="cpu", say=lambda _: None)


def test_a_base_is_not_retrained_under_cells_that_ran_from_an_earlier_one(tmp_path):
  path, root = write_grid(tmp_path, **BASE_GRID), str(tmp_path / "root")
  status.write_status(root, "method=tuned", state="done", exit_code=0)  # then base deleted
  with pytest.raises(ConfigError, match=re.escape(
      f"not trained, but 1 cell(s) already ran from an earlier one: delete them too "
      f"({root}/method=tuned) to redo them from a new base")):
    commands.run(path, root, backend="cpu", say=lambda _: None)
  assert not os.path.exists(os.path.join(root, grids.BASE))


def _cli():
  import importlib.util
  spec = importlib.util.spec_from_file_location("sweep_cli",
                                                os.path.join(REPO, "experiments", "sweep.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_slurm_array_one_task_per_cell_on_one_node(tmp_path):
  printed = []
  settings = SlurmSettings(gpus_per_node=4, time="01:00:00", job_name="lrxp")
  assert commands.slurm_array(LR_X_PATTERN, "/shared/sweep", settings, dry_run=True,
                              say=printed.append) == 0
  (text,) = printed
  lines = text.splitlines()
  assert lines[0] == "# lrxp.sbatch" and lines[-1] == "sbatch lrxp.sbatch"
  for option in ("--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=4", "--time=01:00:00",
                 "--array=0-7", "--requeue"):
    assert f"#SBATCH {option}" in lines, option
  assert ("srun --kill-on-bad-exit=1 .venv/bin/python experiments/sweep.py run "
          f"{LR_X_PATTERN} --root=/shared/sweep --cell_index=\"$SLURM_ARRAY_TASK_ID\" &") in lines
  # Written (not submitted) without --dry_run; a grid error stops it before anything is written.
  out = tmp_path / "array.sbatch"
  commands.slurm_array(LR_X_PATTERN, "/shared/sweep", settings, out=str(out), say=printed.append)
  assert out.read_text() + "\n" == "\n".join(lines[1:-2]) + "\n"
  bad = write_grid(tmp_path, [("OptimConfig.peak_learnig_rate", [0.1])])
  with pytest.raises(ConfigError, match="peak_learnig_rate"):
    commands.slurm_array(bad, "/shared/sweep", settings, out=str(tmp_path / "bad.sbatch"))
  assert not (tmp_path / "bad.sbatch").exists()


def test_an_explicit_cell_is_started_even_if_another_host_records_it_running(tmp_path):
  cells = grids.expand(grids.load_grid(LR_X_PATTERN))[:2]
  for cell in cells:  # a requeued array task's predecessor, on another node
    status.write_status(tmp_path, cell.name, state="running", pid=1, host="other-node")
  assert runner.to_run(tmp_path, cells) == ([], {c.name: "running" for c in cells})
  assert runner.to_run(tmp_path, cells[:1], explicit=True) == (cells[:1], {})
  status.write_status(tmp_path, cells[0].name, state="done", exit_code=0)
  assert runner.to_run(tmp_path, cells[:1], explicit=True) == ([], {cells[0].name: "done"})


def test_sigterm_to_the_sweep_reaches_every_cells_process(tmp_path):
  from lcjax.sweep.placement import Placement

  sleeper = [sys.executable, "-c", "import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\nprint('re' + 'ady', flush=True)\n"
             "time.sleep(60)"]
  with open(tmp_path / "log", "wb") as log, runner.passing_on_sigterm():
    procs = [runner._start(sleeper, Placement(devices=(), env={}, cpus=None), log)
             for _ in range(2)]
    while (tmp_path / "log").read_text().count("ready") < 2:  # both handle SIGTERM now
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
    assert [p.wait(timeout=30) for p in procs] == [7, 7]  # each handled SIGTERM itself


def test_after_sigterm_the_sweep_starts_no_further_cell(tmp_path, monkeypatch):
  from lcjax.sweep.placement import Placement

  cells = grids.expand(grids.load_grid(LR_X_PATTERN))[:3]
  ran = []

  def run_cell(grid, cell, *args):  # the first cell's run is cut short by a SIGTERM
    ran.append(cell.name)
    os.kill(os.getpid(), signal.SIGTERM)
    assert runner._STOPPING.wait(timeout=30)  # as its process ends once SIGTERM reached it
    return "failed"

  monkeypatch.setattr(runner, "run_cell", run_cell)
  with runner.passing_on_sigterm():
    states = runner.run_cells({}, cells, tmp_path, {c.name: 1 for c in cells},
                              [Placement(devices=(), env={}, cpus=None)],
                              say=lambda _: None)
  assert ran == [cells[0].name] and states == {cells[0].name: "failed"}


def test_a_cell_process_runs_pinned_to_its_cores(tmp_path):
  from lcjax.sweep.placement import Placement

  show = [sys.executable, "-c", "import os; print('cores', sorted(os.sched_getaffinity(0)))"]
  with open(tmp_path / "log", "wb") as log:
    proc = runner._start(show, Placement(devices=(0,), env={}, cpus=(0,)), log)
    assert proc.wait(timeout=60) == 0
  text = (tmp_path / "log").read_text()
  assert "cores [0]" in text and text.startswith(f"\n$ {shlex.join(show)}\n")  # as given
