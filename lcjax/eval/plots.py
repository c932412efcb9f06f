"""Plots of probe results, taken as plain dicts (one probe of a results.json, see
lcjax.eval.report): a length x depth heatmap, score-vs-x lines, loss-vs-position curves.

Every plot function is `(target, models, *, name, train_length)`: target is a path (a PNG is
written there) or the matplotlib Axes to draw on; models is a list of (label, probe dict), one
per model, all drawn on one figure so that runs can be compared; train_length is one value or
one per model (None: no marker). Nothing depends on a probe's name: "plot", "x", "y" and
"series" in the probe dict say what goes where.

Figures are matplotlib.figure.Figure objects rendered by Agg, never pyplot: nothing needs a
display and no global figure state or backend is touched, whatever the caller uses.
"""

import math
import numbers
import os
from typing import Sequence

import numpy as np
from etils import epath
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

DPI = 100
# Axes whose values are positions in the sequence: the training length is a point on them.
POSITION_AXES = ("length", "position")
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")
CMAP, NORM = "RdYlGn", Normalize(0.0, 1.0)  # heatmaps: red 0 to green 1, every panel alike


def value_key(probe: dict) -> str:
  """The row column a probe plots: "loss" for curves (lower is better), else "score" in [0, 1]."""
  return "loss" if probe.get("plot") == "curve" else "score"


def group_means(rows: Sequence[dict], keys: Sequence[str | None], value: str) -> dict:
  """{tuple of the rows' `keys` values: mean of `value`}, weighted by each row's "n" (samples)
  or "tokens" when present, so that merged rows average what they measured. A key None gives
  None in the tuple (no series); rows without `value` are skipped."""
  sums: dict = {}
  for row in rows:
    if row.get(value) is None:
      continue
    weight = float(row.get("n", row.get("tokens", 1)))
    group = tuple(row.get(k) if k is not None else None for k in keys)
    total, weights = sums.get(group, (0.0, 0.0))
    sums[group] = (total + weight * float(row[value]), weights + weight)
  return {g: (t / w if w else math.nan) for g, (t, w) in sums.items()}


def sort_key(value) -> tuple:
  """Orders numbers by value first, then anything else (strings, None) by its text."""
  number = isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy's too
  return (0, value, "") if number else (1, 0, str(value))


def sort_values(values) -> list:
  """Distinct values in sort_key order."""
  return sorted(set(values), key=sort_key)


def format_value(v) -> str:
  """A tick or column label: 1024 for 1024.0, 0.25 for 0.25."""
  if isinstance(v, numbers.Real) and not isinstance(v, bool) and float(v).is_integer():
    return str(int(v))
  return str(v)


def title(name: str, probe: dict) -> str:
  """"niah_grid: string_match_all (generate)"."""
  what = f"{probe.get('metric', value_key(probe))} ({probe.get('protocol', '?')})"
  return f"{name}: {what}" if name else what


def _per_model(train_length, n: int) -> list:
  """One train length per model from one value (or None) or a sequence of n."""
  if train_length is None or isinstance(train_length, (int, float)):
    return [train_length] * n
  train_length = list(train_length)
  if len(train_length) != n:
    raise ValueError(f"train_length has {len(train_length)} values for {n} models")
  return train_length


def _draw(target, draw, *, n_axes: int = 1, figsize=(6.4, 4.0)):
  """Calls draw(fig, axes) on a new figure saved as a PNG at `target` (a path; returns it), or
  on the given Axes (one, or a sequence of n_axes; returns target)."""
  if isinstance(target, (str, os.PathLike)):
    fig = Figure(figsize=figsize, layout="constrained")
    draw(fig, list(fig.subplots(1, n_axes, squeeze=False)[0]))
    with epath.Path(target).open("wb") as f:  # matplotlib itself writes only local files
      fig.savefig(f, dpi=DPI, format="png")
    return os.fspath(target)
  axes = [target] if isinstance(target, Axes) else list(target)
  if len(axes) != n_axes:
    raise ValueError(f"this plot draws {n_axes} panels; {len(axes)} Axes were given")
  draw(axes[0].figure, axes)
  return target


def _heatmap_panel(ax, label: str, probe: dict, train_length):
  """One model's grid: x columns (sorted), y rows (smallest at the top, as NIAH figures draw
  depth 0 at the top), the mean value per cell as colour and text."""
  x, y = probe["x"], probe["y"]
  means = group_means(probe["rows"], (x, y), value_key(probe))
  ax.set_title(label, pad=14)
  if not means:
    ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes)
    return
  xs, ys = sort_values(k[0] for k in means), sort_values(k[1] for k in means)
  grid = np.full((len(ys), len(xs)), np.nan)
  for (xv, yv), mean in means.items():
    grid[ys.index(yv), xs.index(xv)] = mean
  ax.imshow(np.ma.masked_invalid(grid), cmap=CMAP, norm=NORM, aspect="auto", origin="upper")
  for i, j in zip(*np.nonzero(np.isfinite(grid))):
    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
  ax.set_xticks(range(len(xs)), [format_value(v) for v in xs])
  ax.set_yticks(range(len(ys)), [format_value(v) for v in ys])
  ax.set_xlabel(x)
  ax.set_ylabel(y)
  if train_length is not None and x in POSITION_AXES:
    # Columns are categories: the line goes on the edge after the last trained-on length.
    edge = sum(v <= train_length for v in xs) - 0.5
    ax.axvline(edge, color="black", linestyle="--", linewidth=1.5)
    ax.text(edge, 1.0, "train length", transform=ax.get_xaxis_transform(), ha="center",
            va="bottom", fontsize=7)


def _heatmap_size(models) -> tuple[float, float]:
  """Figure inches that fit the first model's grid (labels legible, cells not stretched)."""
  probe = models[0][1]
  columns = len({r.get(probe["x"]) for r in probe["rows"]})
  rows = len({r.get(probe["y"]) for r in probe["rows"]})
  return (len(models) * (1.5 + 0.65 * columns) + 1.2, 1.8 + 0.4 * rows)


def heatmap(target, models: Sequence[tuple[str, dict]], *, name: str = "", train_length=None):
  """Mean value per (x, y) cell, one panel per model side by side, one shared colourbar
  (red-yellow-green, 0 to 1). target: a path, or one Axes per model."""
  train_lengths = _per_model(train_length, len(models))
  first = models[0][1]

  def draw(fig, axes):
    for ax, (label, probe), length in zip(axes, models, train_lengths):
      _heatmap_panel(ax, label, probe, length)
    fig.colorbar(ScalarMappable(NORM, CMAP), ax=axes, label=first.get("metric", value_key(first)))
    fig.suptitle(title(name, first))
  return _draw(target, draw, n_axes=len(models), figsize=_heatmap_size(models))


def _series_panel(ax, models, train_lengths, *, log_span: float):
  """One line per (model, series value): colour by series value, line style and marker by
  model; the training length as a dashed vertical line when x is a position; a log2 x axis
  when the x values are positive and max/min exceeds log_span. Returns the sorted x values."""
  x, series = models[0][1]["x"], models[0][1].get("series")
  key = value_key(models[0][1])
  all_means = [group_means(p["rows"], (series, x), key) for _, p in models]
  series_values = sort_values(s for means in all_means for s, _ in means)
  colours = {s: f"C{i % 10}" for i, s in enumerate(series_values)}
  for m, ((label, _), means) in enumerate(zip(models, all_means)):
    for s in series_values:
      points = sorted((xv, v) for (sv, xv), v in means.items() if sv == s and xv is not None)
      if not points:
        continue
      names = ([label] if len(models) > 1 else []) + ([f"{series}={s}"] if series else [])
      ax.plot(*zip(*points), color=colours[s], linestyle=LINESTYLES[m % len(LINESTYLES)],
              marker=MARKERS[m % len(MARKERS)], markersize=4, label=", ".join(names) or label)
  xs = sort_values(xv for means in all_means for _, xv in means if xv is not None)
  if x in POSITION_AXES:
    for length in sort_values(t for t in train_lengths if t is not None):
      ax.axvline(length, color="grey", linestyle="--", linewidth=1.2, label="train length")
  if xs and min(xs) > 0 and max(xs) > log_span * min(xs):
    ax.set_xscale("log", base=2)
  ax.set_xlabel(x)
  ax.legend(fontsize=7)
  return xs


def lines(target, models: Sequence[tuple[str, dict]], *, name: str = "", train_length=None):
  """Score vs x, one line per series value and model; log2 x axis when x spans more than 4x,
  ticks at the measured x values. target: a path or an Axes."""
  train_lengths = _per_model(train_length, len(models))

  def draw(fig, axes):
    ax = axes[0]
    ticks = _series_panel(ax, models, train_lengths, log_span=4.0)
    if len(ticks) <= 16 and all(isinstance(v, numbers.Real) for v in ticks):
      ax.set_xticks(ticks, [format_value(v) for v in ticks])
      ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel(models[0][1].get("metric", "score"))
    ax.set_title(title(name, models[0][1]))
  return _draw(target, draw)


def perplexity(loss):
  """exp(loss), bounded: exp overflows float64 past ~709 nats."""
  return np.exp(np.minimum(loss, 50.0))


def _loss_of(ppl):
  """log(ppl), the inverse of perplexity for the axis; matplotlib also asks at 0."""
  return np.log(np.maximum(ppl, 1e-300))


def curve(target, models: Sequence[tuple[str, dict]], *, name: str = "", train_length=None):
  """Loss (nats per token) vs position on a log2 x axis, one curve per series value (the
  sequence length) and model, perplexity on the right axis. target: a path or an Axes."""
  train_lengths = _per_model(train_length, len(models))

  def draw(fig, axes):
    ax = axes[0]
    _series_panel(ax, models, train_lengths, log_span=1.0)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value(float(v))))
    ax.set_ylabel("loss (nats/token)")
    ax.secondary_yaxis("right", functions=(perplexity, _loss_of)).set_ylabel("perplexity")
    ax.set_title(title(name, models[0][1]))
  return _draw(target, draw)


PLOTS = {"heatmap": heatmap, "lines": lines, "curve": curve}


def heatmap_image(probe: dict, train_length=None, *, name: str = "") -> np.ndarray:
  """The heatmap of one probe as uint8 RGB pixels [H, W, 3] (for TensorBoard images)."""
  models = [("", probe)]
  fig = Figure(figsize=_heatmap_size(models), dpi=DPI, layout="constrained")
  canvas = FigureCanvasAgg(fig)
  heatmap(fig.subplots(1, 1), models, name=name, train_length=train_length)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()
