"""Every grid in experiments/ expands into cells whose bindings gin accepts."""

import glob
import importlib.util
import os

import gin
import pytest

from lcjax.config import parse_gin
from lcjax.data.pipeline import DataConfig
from lcjax.models.config import ModelConfig
from lcjax.run import Run
from tests.train.runs import REPO

_spec = importlib.util.spec_from_file_location("sweep", os.path.join(REPO, "experiments", "sweep.py"))
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

# A grid is a file with get_config() (experiments/ also holds scripts, e.g. demo_retrieval.py).
GRIDS = [g for g in glob.glob(os.path.join(REPO, "experiments", "*.py"))
         if "\ndef get_config(" in open(g).read()]


def test_there_are_grids():
  assert GRIDS


@pytest.mark.parametrize("path", GRIDS, ids=os.path.basename)
def test_grid_cells_are_valid_runs(path):
  grid = sweep.load_grid(path)
  cells = sweep.cells(grid)
  assert len(cells) == len({name for name, _ in cells})  # distinct work directories
  expected = 1
  for _, values in grid.axes:
    expected *= len(values)
  assert len(cells) == expected
  for _, bindings in cells:
    gin.clear_config()
    try:
      parse_gin([os.path.join(REPO, f) for f in grid.gin_files], bindings)
      run = Run.from_gin()  # type checks and validation of every config
      assert isinstance(run.model, ModelConfig) and isinstance(run.data, DataConfig)
    finally:
      gin.clear_config()


def test_cell_values_reach_the_configs():
  grid = sweep.load_grid(os.path.join(REPO, "experiments", "lr_x_pattern.py"))
  name, bindings = sweep.cells(grid)[-1]
  gin.clear_config()
  try:
    parse_gin([os.path.join(REPO, "configs", "demo.gin")], bindings)
    run = Run.from_gin()
  finally:
    gin.clear_config()
  assert run.optim.peak_learning_rate == 1e-2 and run.model.pattern == "*-*-"
  assert "peak_learning_rate=0.01" in name
