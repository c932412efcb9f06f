"""A sweep's results: one row per cell (its axis values, state, final train metrics, eval
results) -> ROOT/results.csv, ROOT/report.md and PNGs: the chosen metric against each axis,
and every cell's training-loss curve. Reads and writes through etils.epath (ROOT may be gs://).

Against axis A, one line per value of another axis B (the first other one that is not "seed");
the points average the done cells over the rest (seeds included), their min-max shaded.
"""

import csv
import io
import json
import math
import re

import numpy as np
from etils import epath

from lcjax.sweep import runner, status
from lcjax.sweep.grid import BASE, SEED, Cell, axis_names, base_cell, cell_run, short, validate
from lcjax.train.metrics import read_metrics

FIRST = ("cell", "state", "step", "parameters")


def _final_metrics(workdir: epath.Path) -> tuple[dict, list[tuple[int, float]]]:
  """(last train record merged with the last eval record, [(step, loss)])."""
  records = read_metrics(workdir)
  train = [r for r in records if r.get("loss") is not None]
  evals = [r for r in records if any(k.startswith("eval/") for k in r)]
  final = {**(evals[-1] if evals else {}), **(train[-1] if train else {})}
  final.pop("step", None)
  return final, [(r["step"], r["loss"]) for r in train]


def _eval_results(workdir: epath.Path) -> dict:
  """The newest eval/<step>/results.json as flat scalars ("eval/..." and "suite/...")."""
  from lcjax.eval.report import scalars

  directory = workdir / "eval"
  steps = sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit()) if (
      directory.exists()) else []
  for step in reversed(steps):
    path = directory / str(step) / "results.json"
    if path.exists():
      results = json.loads(path.read_text())
      flat = {(k if k.startswith("eval/") else f"eval/{k}"): v
              for k, v in results.get("metrics", {}).items()}
      return {**flat, **scalars(results.get("probes", {}))}
  return {}


def collect(grid, cells: list[Cell], root) -> tuple[list[dict], dict]:
  """(rows, {cell name: [(step, loss)]}): one row per cell, in grid order; "parameters" is
  the cell's model size, counted from its config. In a grid with a base, "step" counts the
  base's steps too, a cell that only evaluates the base shows the base's training metrics, and
  the others' curves continue the base's."""
  from lcjax.models.report import counted_params

  rows, curves, base_steps = [], {}, 0
  steps = validate(grid, cells, runner.REPO) if base_cell(grid) is not None else {}
  if steps:
    base_final, curves[BASE] = _final_metrics(status.cell_dir(root, BASE))
    base_steps = status.last_step(status.cell_dir(root, BASE))
  for cell in cells:
    workdir = status.cell_dir(root, cell.name)
    state, record = status.state_of(root, cell.name)
    if steps.get(cell.name) == 0:  # the base, evaluated its own way
      final, step = base_final, base_steps
    else:
      final, curve = _final_metrics(workdir)
      curves[cell.name] = [(s + base_steps, loss) for s, loss in curve]
      step = base_steps + status.last_step(workdir)
    row = {"cell": cell.name, "state": state, "step": step,
           **{short(n): cell.values[n] for n in axis_names(grid)},
           "parameters": counted_params(cell_run(grid, cell, runner.REPO).model)}
    row.update({k: v for k, v in final.items() if isinstance(v, (int, float))})
    row.update(_eval_results(workdir))
    rows.append(row)
  return rows, curves


def columns(grid, rows: list[dict]) -> list[str]:
  axes = [short(n) for n in axis_names(grid)]
  metrics = sorted({k for r in rows for k in r} - set(FIRST) - set(axes),
                   key=lambda k: (k != "loss", "/" in k, k))
  return ["cell", *axes, "state", "step", "parameters", *metrics]


def _fmt(value) -> str:
  if isinstance(value, float):
    return "" if math.isnan(value) else f"{value:.4g}"
  return "" if value is None else str(value)


def write_csv(path: epath.Path, cols: list[str], rows: list[dict]) -> None:
  out = io.StringIO()
  writer = csv.DictWriter(out, cols, extrasaction="ignore")
  writer.writeheader()
  writer.writerows(rows)
  path.write_text(out.getvalue())


def markdown(cols: list[str], rows: list[dict], metric: str, plots: list[str],
             claim: str = "", analysis: str = "") -> str:
  # The table keeps to the axes, the loss and the chosen metric; results.csv has every column.
  shown = [c for c in cols if c in (*cols[:cols.index("parameters") + 1], "loss", metric)]
  lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
  escape = lambda text: re.sub(r"([|*])", r"\\\1", text)  # noqa: E731  (markdown marks)
  lines += ["| " + " | ".join(escape(_fmt(r.get(c))) for c in shown) + " |" for r in rows]
  images = [f"![{p}]({p})" for p in plots]
  head = [f"# Sweep results ({len(rows)} cells)", ""]
  if claim:
    head += ["## Claim and expected direction", "", claim, "", "## Measured", ""]
  if analysis:
    head += [analysis, ""]
  return "\n".join([*head,
                    f"Every column, eval results included: results.csv. Plots of `{metric}` "
                    "and the grid's figures (done cells only).",
                    "", *lines, "", *images, ""])


def _line_axis(grid, axis: str | None) -> str | None:
  """The axis whose values are a plot's lines: the first one that is neither x nor "seed"."""
  return next((short(n) for n in axis_names(grid) if short(n) not in (axis, SEED)), None)


def _stats(rows: list[dict], value) -> tuple[float, float, float]:
  """(mean, min, max) of value(row) over the done rows where it is a finite number."""
  ys = [value(r) for r in rows if r["state"] == "done"]
  ys = [y for y in ys if isinstance(y, (int, float)) and math.isfinite(y)]
  return (np.mean(ys), min(ys), max(ys)) if ys else (np.nan,) * 3


def _lines(grid, rows: list[dict], other: str | None, default_label: str, xs: list,
           value) -> dict:
  """{line label: (means, mins, maxs) over xs}: value(row, x) averaged per value of `other`."""
  values = {short(n): list(v) for n, v in grid.axes}
  lines = {}
  for line_value in (values[other] if other else [None]):
    group = [r for r in rows if other is None or r.get(other) == line_value]
    stats = [_stats(group, lambda r, x=x: value(r, x)) for x in xs]
    label = f"{other}={line_value}" if other else default_label
    lines[label] = tuple(np.array(s) for s in zip(*stats))
  return lines


def _series(grid, rows: list[dict], metric: str, axis: str):
  """(x labels, {line label: (means, mins, maxs)}) of `metric` against `axis`."""
  xs = list(dict(grid.axes)[next(n for n in axis_names(grid) if short(n) == axis)])
  lines = _lines(grid, rows, _line_axis(grid, axis), metric, xs,
                 lambda r, x: r.get(metric) if r.get(axis) == x else None)
  return [str(v) for v in xs], lines


def _pattern_columns(rows: list[dict], pattern: str) -> dict[str, str]:
  """{x value: column} of the columns that `pattern`'s one "*" matches, x sorted (numbers by
  value)."""
  regex = re.compile(re.escape(pattern).replace(r"\*", "([^/]+)") + "$")
  found = {m.group(1): c for c in {k for r in rows for k in r} if (m := regex.match(c))}

  def key(x):
    try:
      return (0, float(x), x)
    except ValueError:
      return (1, 0.0, x)

  return {x: found[x] for x in sorted(found, key=key)}


def _save(fig, path: epath.Path) -> None:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
  path.write_bytes(buffer.getvalue())


def plot_metric(grid, rows: list[dict], metric: str, axis: str, path: epath.Path) -> None:
  labels, lines = _series(grid, rows, metric, axis)
  _plot_lines(grid, labels, lines, axis, metric, path)


def plot_pattern(grid, rows: list[dict], pattern: str, x_label: str, path: epath.Path) -> None:
  """One of the grid's figures: the columns `pattern` matches against their "*" value."""
  from lcjax.errors import ConfigError

  by_x = _pattern_columns(rows, pattern)
  if not by_x:
    raise ConfigError(f"The grid's figure {pattern!r} matches no column of results.csv.")
  lines = _lines(grid, rows, _line_axis(grid, None), pattern, list(by_x),
                 lambda r, x: r.get(by_x[x]))
  _plot_lines(grid, list(by_x), lines, x_label, pattern.replace("*", x_label), path)


def _plot_lines(grid, labels: list[str], lines: dict, x_label: str, y_label: str,
                path: epath.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.5))
  x = np.arange(len(labels))
  for label, (mean, low, high) in lines.items():
    ax.plot(x, mean, marker="o", label=label)
    ax.fill_between(x, low, high, alpha=0.2)
  ax.set_xticks(x, labels, rotation=20)
  ax.set_xlabel(x_label)
  ax.set_ylabel(y_label)
  ax.set_title(f"{y_label} by {x_label}" + (" (mean, min-max over seeds)" if any(
      short(n) == SEED for n in axis_names(grid)) else ""), fontsize=9)
  ax.legend(fontsize=7)
  _save(fig, path)
  plt.close(fig)


def plot_curves(curves: dict, path: epath.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, points in curves.items():
    if points:
      ax.plot(*zip(*points), label=name, linewidth=1)
  ax.set_xlabel("step")
  ax.set_ylabel("train loss")
  ax.set_yscale("log")  # early losses can be 10x the final ones
  ax.set_title("training loss of every cell", fontsize=9)
  ax.legend(fontsize=6, ncol=2)
  _save(fig, path)
  plt.close(fig)


def write_report(grid, cells: list[Cell], root, metric: str = "loss",
                 out=None) -> list[str]:
  """Writes results.csv, report.md and the PNGs into `out` (default ROOT); returns their
  paths. A grid's `analysis(out)` (a measurement that needs no cell, e.g. of numerics) writes
  its own files there and returns the markdown that report.md shows under the claim."""
  from lcjax.errors import ConfigError

  root = epath.Path(root)
  rows, curves = collect(grid, cells, root)
  cols = columns(grid, rows)
  if metric not in cols:
    raise ConfigError(f"No metric {metric!r} in this sweep's results: choose --metric from "
                      + ", ".join(c for c in cols if c not in FIRST) + ".")
  root = epath.Path(out) if out is not None else root
  root.mkdir(parents=True, exist_ok=True)
  analysis = grid.analysis(root) if grid.get("analysis", None) else ""
  plots = []
  for name in axis_names(grid):
    if short(name) != SEED:
      plots.append(f"{metric.replace('/', '_')}_by_{short(name)}.png")
      plot_metric(grid, rows, metric, short(name), root / plots[-1])
  for pattern, x_label in grid.get("figures", []):
    plots.append(re.sub(r"[^\w=.-]+", "_", pattern.replace("*", x_label)) + ".png")
    plot_pattern(grid, rows, pattern, x_label, root / plots[-1])
  plots.append("train_loss.png")
  plot_curves(curves, root / plots[-1])
  write_csv(root / "results.csv", cols, rows)
  (root / "report.md").write_text(markdown(cols, rows, metric, plots, grid.get("claim", ""),
                                           analysis))
  return [str(root / f) for f in ("results.csv", "report.md", *plots)]
