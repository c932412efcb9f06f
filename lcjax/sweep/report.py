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

from lcjax.sweep import status
from lcjax.train.metrics import read_metrics
from lcjax.sweep.grid import SEED, Cell, axis_names, short

FIRST = ("cell", "state", "step")


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
  """(rows, {cell name: [(step, loss)]}): one row per cell, in grid order."""
  rows, curves = [], {}
  for cell in cells:
    workdir = status.cell_dir(root, cell.name)
    state, record = status.state_of(root, cell.name)
    final, curves[cell.name] = _final_metrics(workdir)
    row = {"cell": cell.name, "state": state, "step": status.last_step(workdir),
           **{short(n): cell.values[n] for n in axis_names(grid)}}
    row.update({k: v for k, v in final.items() if isinstance(v, (int, float))})
    row.update(_eval_results(workdir))
    rows.append(row)
  return rows, curves


def columns(grid, rows: list[dict]) -> list[str]:
  axes = [short(n) for n in axis_names(grid)]
  metrics = sorted({k for r in rows for k in r} - set(FIRST) - set(axes),
                   key=lambda k: (k != "loss", "/" in k, k))
  return ["cell", *axes, "state", "step", *metrics]


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


def markdown(cols: list[str], rows: list[dict], metric: str, plots: list[str]) -> str:
  # The table keeps to the axes, the loss and the chosen metric; results.csv has every column.
  shown = [c for c in cols if c in (*cols[:cols.index("step") + 1], "loss", metric)]
  lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
  escape = lambda text: re.sub(r"([|*])", r"\\\1", text)  # noqa: E731  (markdown marks)
  lines += ["| " + " | ".join(escape(_fmt(r.get(c))) for c in shown) + " |" for r in rows]
  images = [f"![{p}]({p})" for p in plots]
  return "\n".join([f"# Sweep results ({len(rows)} cells)", "",
                    f"Every column, eval results included: results.csv. Plots of `{metric}` "
                    "(done cells only).",
                    "", *lines, "", *images, ""])


def _series(grid, rows: list[dict], metric: str, axis: str):
  """(x labels, {line label: (means, mins, maxs)}) of `metric` against `axis`."""
  names = [short(n) for n in axis_names(grid)]
  values = {short(n): list(v) for n, v in grid.axes}
  other = next((n for n in names if n not in (axis, SEED)), None)
  lines = {}
  for line_value in (values[other] if other else [None]):
    stats = []
    for x in values[axis]:
      ys = [r[metric] for r in rows if r.get(axis) == x and r["state"] == "done"
            and (other is None or r.get(other) == line_value)
            and isinstance(r[metric], (int, float)) and math.isfinite(r[metric])]
      stats.append((np.mean(ys), min(ys), max(ys)) if ys else (np.nan,) * 3)
    label = f"{other}={line_value}" if other else metric
    lines[label] = tuple(np.array(s) for s in zip(*stats))
  return [str(v) for v in values[axis]], lines


def _save(fig, path: epath.Path) -> None:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
  path.write_bytes(buffer.getvalue())


def plot_metric(grid, rows: list[dict], metric: str, axis: str, path: epath.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  labels, lines = _series(grid, rows, metric, axis)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  x = np.arange(len(labels))
  for label, (mean, low, high) in lines.items():
    ax.plot(x, mean, marker="o", label=label)
    ax.fill_between(x, low, high, alpha=0.2)
  ax.set_xticks(x, labels, rotation=20)
  ax.set_xlabel(axis)
  ax.set_ylabel(metric)
  ax.set_title(f"{metric} by {axis}" + (" (mean, min-max over seeds)" if any(
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


def write_report(grid, cells: list[Cell], root, metric: str = "loss") -> list[str]:
  """Writes results.csv, report.md and the PNGs into ROOT; returns their paths."""
  from lcjax.errors import ConfigError

  root = epath.Path(root)
  rows, curves = collect(grid, cells, root)
  cols = columns(grid, rows)
  if metric not in cols:
    raise ConfigError(f"No metric {metric!r} in this sweep's results: choose --metric from "
                      + ", ".join(c for c in cols if c not in FIRST) + ".")
  root.mkdir(parents=True, exist_ok=True)
  plots = []
  for name in axis_names(grid):
    if short(name) != SEED:
      plots.append(f"{metric.replace('/', '_')}_by_{short(name)}.png")
      plot_metric(grid, rows, metric, short(name), root / plots[-1])
  plots.append("train_loss.png")
  plot_curves(curves, root / plots[-1])
  write_csv(root / "results.csv", cols, rows)
  (root / "report.md").write_text(markdown(cols, rows, metric, plots))
  return [str(root / f) for f in ("results.csv", "report.md", *plots)]
