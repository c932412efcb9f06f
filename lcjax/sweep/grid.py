"""A grid file and its cells: expansion, names, and validation of every cell before any runs.

A grid is a Python file whose `get_config()` returns an ml_collections ConfigDict with
  gin_files: gin files every cell uses (paths relative to the repository root)
  bindings:  gin bindings every cell uses
  axes:      [(gin parameter, [values])]; the cells are their product. The parameter "seed"
             binds both seeds of a run (TrainConfig.seed: initialization, DataConfig.seed:
             data order), and the report averages over it. An axis of variants that differ in
             several bindings is (name, {label: [bindings]}), e.g. ("model", {"hybrid":
             ["ModelConfig.pattern = 'M*M-'", ...], "transformer": [...]}).
  eval:      optional, True or a list of probes: `python -m lcjax.eval` on each trained cell.
  base:      optional, bindings (after the grid's) of one run that every cell starts from,
             trained first in ROOT/base. A cell whose run (lcjax.run.Run: model, data,
             training) is the base's trains nothing: it evaluates the base's checkpoint its own
             way (e.g. EvalConfig.attention). Any other cell trains from the base's checkpoint
             (TrainConfig.init_from): its own steps and stages are what follows the base.
  claim:     optional, the claim the grid tests and the direction expected, for report.md.
  metric:    optional, the metric the report plots against each axis (default "loss").
  figures:   optional, [(column pattern, x label)]: a figure per pattern, whose one "*" stands
             for the x values (e.g. "suite/mqar/pairs=*" plots a probe's score by its pairs),
             one line per value of the first axis that is not "seed".
  analysis:  optional, a function of the report's directory that writes a measurement needing
             no cell (e.g. of numerics) and returns its markdown for report.md.
"""

import dataclasses
import importlib.util
import itertools
import os
import re
from collections.abc import Mapping

from lcjax.errors import ConfigError

SEED = "seed"
BASE = "base"  # the base run's name and directory in ROOT
SEED_BINDINGS = ("TrainConfig.seed", "DataConfig.seed")


@dataclasses.dataclass(frozen=True)
class Cell:
  index: int
  name: str
  values: dict  # {axis parameter: value}
  bindings: tuple[str, ...]  # the grid's own bindings, then the cell's


def grid_module(path: str, name: str = "grid"):
  """The module of grid file `path`, executed: also how a grid builds on another's models or
  methods (grid files are not a package, so they cannot import each other)."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_grid(path: str):
  """The ConfigDict of grid file `path`; a ConfigError when it is not a grid."""
  if not os.path.isfile(path):
    raise ConfigError(f"No grid file {path}: give a Python file with get_config() (e.g. "
                      "experiments/lr_x_pattern.py).")
  module = grid_module(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config(): it is not a grid.")
  grid = module.get_config()
  for key in ("gin_files", "bindings", "axes"):
    if key not in grid:
      raise ConfigError(f"Grid {path} has no {key!r}: set c.{key} in its get_config().")
  return grid


def axis_names(grid) -> list[str]:
  return [name for name, _ in grid.axes]


def short(name: str) -> str:
  """An axis' column label: the parameter's last part (ModelConfig.pattern -> pattern)."""
  return name.split(".")[-1]


def _label(names, values) -> str:
  # Directory-safe: "*" (attention in a layer pattern) becomes "A".
  label = "_".join(f"{short(n)}={v}" for n, v in zip(names, values)).replace("*", "A")
  return re.sub(r"[^A-Za-z0-9_.=-]+", "", label) or "base"


def _bindings(name: str, values, value) -> list[str]:
  """The bindings of one axis value: a variant's own list, or `parameter = value`."""
  if isinstance(values, Mapping):
    return list(values[value])
  params = SEED_BINDINGS if name == SEED else (name,)
  return [f"{p} = {value!r}" for p in params]


def expand(grid) -> list[Cell]:
  """The grid's cells, in the order of the product of its axes (the last varies fastest).
  A ConfigError for an empty axis or two cells with the same name."""
  names = axis_names(grid)
  for name, values in grid.axes:
    if not len(values):
      raise ConfigError(f"Grid axis {name!r} has no values: give it at least one, or remove it.")
  cells, seen = [], {}
  for i, values in enumerate(itertools.product(*(values for _, values in grid.axes))):
    name = _label(names, values)
    if name in seen:
      raise ConfigError(
          f"Grid cells {seen[name]} and {i} are both named {name!r} (one work directory): "
          "make the axis values differ in letters, digits or '.=-_'.")
    if name == BASE and base_cell(grid) is not None:
      raise ConfigError(f"Grid cell {i} is named {BASE!r}, the directory of the grid's base "
                        "run: give its axis value another name.")
    seen[name] = i
    extra = [b for (n, axis), v in zip(grid.axes, values) for b in _bindings(n, axis, v)]
    cells.append(Cell(i, name, dict(zip(names, values)), tuple(grid.bindings) + tuple(extra)))
  return cells


def base_cell(grid) -> Cell | None:
  """The grid's base run as a cell (named BASE, index -1), or None when it has none."""
  if grid.get("base", None) is None:
    return None
  return Cell(-1, BASE, {}, tuple(grid.bindings) + tuple(grid.base))


def select(cells: list[Cell], name: str | None = None, index: int | None = None) -> list[Cell]:
  """All cells, or the one named or at `index`; a ConfigError listing the choices."""
  if name is None and index is None:
    return cells
  chosen = [c for c in cells if c.name == name or c.index == index]
  if not chosen:
    which = f"--cell={name}" if name is not None else f"--cell_index={index}"
    raise ConfigError(f"No cell {which} in this grid: its {len(cells)} cells are "
                      + ", ".join(f"{c.index}: {c.name}" for c in cells) + ".")
  return chosen


def cell_run(grid, cell: Cell, repo: str):
  """The lcjax.run.Run of a cell's gin (parsed in this process, nothing started); else a
  ConfigError naming the cell and the cause."""
  import gin

  import lcjax.eval.suite  # noqa: F401  (what the CLIs import before parsing gin)
  import lcjax.models.allocation  # noqa: F401
  from lcjax.config import parse_gin
  from lcjax.run import Run

  gin.clear_config()
  try:
    parse_gin([os.path.join(repo, f) for f in grid.gin_files], list(cell.bindings))
    return Run.from_gin()
  except Exception as e:  # gin raises several types; each names the binding
    raise ConfigError(f"Grid cell {cell.index} ({cell.name}) is not a valid run, nothing was "
                      f"started: {_first_line(e)}") from e
  finally:
    gin.clear_config()


def validate(grid, cells: list[Cell], repo: str) -> dict[str, int]:
  """{cell name: the steps it trains} (the base's under BASE, 0 for a cell that only evaluates
  the base), once every cell's gin parses and builds a valid Run; else a ConfigError naming
  the first cell that does not and the cause."""
  base = base_cell(grid)
  if base is None:
    return {cell.name: cell_run(grid, cell, repo).train.steps for cell in cells}
  base_run = cell_run(grid, base, repo)
  steps = {BASE: base_run.train.steps}
  for cell in cells:
    run = cell_run(grid, cell, repo)
    steps[cell.name] = 0 if run == base_run else run.train.steps
    if not steps[cell.name] and not grid.get("eval", None):
      raise ConfigError(f"Grid cell {cell.index} ({cell.name}) is the base run itself and the "
                        "grid has no `eval`: it would do nothing. Set c.eval, or change the "
                        "cell's training.")
  return steps


def _first_line(e: Exception) -> str:
  text = str(e).strip() or type(e).__name__
  return " ".join(text.split("\n")[:3])
