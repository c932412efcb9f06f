"""An evaluation's files: results.json, one CSV per probe, one PNG per probe and report.md.

The results dict (what the suite produces; plain JSON values):
  {"model": label, "step": int, "checkpoint": path, "train_length": int or None,
   "attention_overrides": {AttentionConfig field: value} (optional: EvalConfig.attention),
   "probes": {name: {"protocol": "generate" | "teacher_forced", "metric": str,
                     "plot": "heatmap" | "lines" | "curve" | None,
                     "x": column, "y": column (heatmap), "series": column or None,
                     "rows": [{column: value, ...}, ...]}}}
Rows hold "score" in [0, 1] (higher is better), or "loss" in nats per token for "curve"
probes (lower is better); "n" or "tokens" weigh rows when they are averaged. Extra row
columns are kept in the CSV. Nothing here depends on a probe's name. Directories may be local
or remote (gs://): every file goes through epath.
"""

import csv
import io
import json
import math
import re
from typing import Sequence

import numpy as np
from etils import epath

from lcjax.eval import plots

RESULTS = "results.json"
REPORT = "report.md"
PROBE_KEYS = ("plot", "x", "rows")  # what every probe must hold ("y" too for heatmaps)

PROTOCOLS = {
    "generate": "generated: greedy decoding with the caches from the prompt; the generated "
                "text is scored",
    "teacher_forced": "teacher-forced: each scored token is predicted from the true previous "
                      "tokens in one forward pass, nothing is generated",
}
METRICS = {
    "string_match_all": "the fraction of expected strings found in the output (higher is "
                        "better)",
    "string_match_part": "whether any expected string is found in the output (higher is "
                         "better)",
    "exact_match": "the fraction of answers exactly right (higher is better)",
    "loss": "mean cross-entropy in nats per token (lower is better; perplexity = exp(loss))",
}


def results_problems(results) -> list[str]:
  """What makes `results` unusable as a results dict (empty when nothing)."""
  if not isinstance(results, dict):
    return [f"the top level is a {type(results).__name__}, not an object"]
  probes = results.get("probes")
  if not isinstance(probes, dict):
    return ['"probes" (an object of probe name -> probe) is missing' if probes is None
            else f'"probes" is a {type(probes).__name__}, not an object']
  problems = []
  for name, probe in probes.items():
    if not isinstance(probe, dict):
      problems.append(f'probe "{name}" is a {type(probe).__name__}, not an object')
      continue
    missing = [k for k in PROBE_KEYS if k not in probe]
    if probe.get("plot") == "heatmap" and "y" not in probe:
      missing.append("y")
    if missing:
      problems.append(f'probe "{name}" lacks {", ".join(missing)}')
    elif not isinstance(probe["rows"], list):
      problems.append(f'probe "{name}": "rows" is not a list')
  return problems


def _check(results, source: str) -> None:
  problems = results_problems(results)
  if problems:
    raise ValueError(f"{source} is not an evaluation results file: {'; '.join(problems)}.")


def load_results(path: str) -> dict:
  """The results dict of a results.json, or of the one in directory `path`. Raises ValueError
  naming the path and what is missing or malformed."""
  given = epath.Path(path)
  file = given / RESULTS if given.is_dir() else given
  if not file.exists() or file.is_dir():
    where = f"{path} is a directory without {RESULTS}" if given.is_dir() else (
        f"{path} does not exist")
    raise ValueError(f"No evaluation results at {path}: {where}. Give a {RESULTS} or the "
                     "directory an evaluation wrote its results to.")
  try:
    results = json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{file} is not valid JSON ({e}); it is not an evaluation results "
                     "file.") from e
  _check(results, file)
  return results


def _plain(value):
  """json.dump's fallback for numpy scalars and arrays."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"{type(value).__name__} is not JSON serializable")


def file_stem(name: str) -> str:
  """A probe name as a file name (anything but letters, digits, '.', '-' and '_' -> '_')."""
  return re.sub(r"[^\w.-]+", "_", name)


def write_results(out_dir: str, results: dict) -> list[str]:
  """out_dir/results.json (indent 2) and out_dir/<probe>.csv per probe (columns: the union of
  the rows' keys in first-seen order; "ppl" = exp(loss) added for curves). Returns the paths."""
  _check(results, "results")
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / RESULTS).write_text(json.dumps(results, indent=2, default=_plain) + "\n")
  written = [str(out / RESULTS)]
  for name, probe in results["probes"].items():
    rows = [dict(row) for row in probe["rows"]]
    if probe["plot"] == "curve":
      for row in rows:
        if "ppl" not in row and row.get("loss") is not None:
          row["ppl"] = float(plots.perplexity(float(row["loss"])))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    path = out / (file_stem(name) + ".csv")
    path.write_text(text.getvalue())
    written.append(str(path))
  return written


def _labels(all_results: Sequence[dict]) -> list[str]:
  """Legend labels: each results' "model" (default "model <i>"); a name that repeats gets
  its step, and a label that still repeats its index."""
  names = [str(r.get("model") or f"model {i}") for i, r in enumerate(all_results)]
  labels = [f"{n} @{r['step']}" if names.count(n) > 1 and r.get("step") is not None else n
            for n, r in zip(names, all_results)]
  return [f"{label} #{i}" if labels.count(label) > 1 else label
          for i, label in enumerate(labels)]


def _probe_names(models: Sequence[tuple[str, dict]]) -> list[str]:
  """Every probe of any model: the evaluated model's in its order, then the others'."""
  return list(dict.fromkeys(n for _, r in models for n in r["probes"]))


def _column_key(probe: dict):
  """The summary's columns: lengths wherever the probe varies the length, else its x."""
  axes = (probe.get("x"), probe.get("y"), probe.get("series"))
  return "length" if "length" in axes else probe.get("x")


def _row_key(probe: dict, column):
  """The series that gets its own summary row: only for "lines" (a curve's series is the
  column; a heatmap's y is averaged over)."""
  series = probe.get("series")
  return series if probe.get("plot") == "lines" and series not in (None, column) else None


def summary(probe: dict) -> tuple[str, str | None, dict]:
  """(column key, series key or None, {(series value, column value): mean}): what a probe's
  summary-table rows and its in-loop scalars show."""
  column = _column_key(probe)
  series = _row_key(probe, column)
  return column, series, plots.group_means(probe["rows"], (series, column),
                                           plots.value_key(probe))


def scalars(probes: dict, prefix: str = "suite") -> dict[str, float]:
  """Flat {"suite/<probe>/[<series>=<s>/]<column>=<value>": mean} for metrics logs."""
  out = {}
  for name, probe in probes.items():
    _, series, means = summary(probe)
    column = _column_key(probe)
    for (s, v), mean in means.items():
      part = f"{series}={plots.format_value(s)}/" if series else ""
      out[f"{prefix}/{name}/{part}{column}={plots.format_value(v)}"] = float(mean)
  return out


def _cell(value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return f"{value:.2f}"


def _md(text) -> str:
  return str(text).replace("|", "\\|")


def summary_tables(models: Sequence[tuple[str, dict]], train_length=None) -> list[str]:
  """Markdown tables, one per column key ("length" first): a row per probe (and series value
  for "lines") and model, the models of one probe and series next to each other; a column
  per value of the key (lengths past `train_length` marked *), then "all"; the mean score
  (mean loss for curves) in each."""
  groups: dict = {}  # column key -> [(probe index, model index, probe name, label, probe)]
  for p, name in enumerate(_probe_names(models)):
    for m, (label, results) in enumerate(models):
      if name in results["probes"]:
        probe = results["probes"][name]
        groups.setdefault(_column_key(probe), []).append((p, m, name, label, probe))
  tables = []
  for column in sorted(groups, key=lambda c: (c != "length", str(c))):
    entries = groups[column]
    values = plots.sort_values(row.get(column) for *_, probe in entries for row in probe["rows"]
                               if row.get(column) is not None)
    head = ["probe"] + (["model"] if len(models) > 1 else []) + ["metric"]
    beyond = [column == "length" and train_length is not None and v > train_length
              for v in values]
    head += [plots.format_value(v) + "*" * b for v, b in zip(values, beyond)] + ["all"]
    rows = []  # (order, cells)
    for p, m, name, label, probe in entries:
      key = plots.value_key(probe)
      _, series, means = summary(probe)
      overall = plots.group_means(probe["rows"], (series,), key)
      for (s,), mean in overall.items():
        cells = [name + (f" · {series}={plots.format_value(s)}" if series else "")]
        cells += ([label] if len(models) > 1 else []) + [probe.get("metric", key)]
        cells += [_cell(means.get((s, v))) for v in values] + [_cell(mean)]
        rows.append(((p, plots.sort_key(s), m), cells))
    lines = [f"By {column}:", "", "| " + " | ".join(map(_md, head)) + " |",
             "|" + "---|" * len(head)]
    rows.sort(key=lambda r: r[0])
    lines += ["| " + " | ".join(map(_md, cells)) + " |" for _, cells in rows]
    if any(beyond):
      lines += ["", f"\\* longer than the training length ({train_length})."]
    tables.append("\n".join(lines))
  return tables


def _header(models: Sequence[tuple[str, dict]]) -> list[str]:
  main = models[0][1]
  step = f" (step {main['step']})" if main.get("step") is not None else ""
  lines = [f"# Evaluation report: {models[0][0]}{step}", "",
           "| | model | step | checkpoint | train length |", "|---|---|---|---|---|"]
  for i, (label, r) in enumerate(models):
    cells = ["evaluated" if i == 0 else "compared", label] + [
        "-" if r.get(k) is None else r[k] for k in ("step", "checkpoint", "train_length")]
    lines.append("| " + " | ".join(map(_md, cells)) + " |")
  for label, r in models:
    if r.get("attention_overrides"):
      lines += ["", f"{_md(label)} was evaluated with attention settings it did not train with "
                    f"(EvalConfig.attention): `{json.dumps(r['attention_overrides'])}`."]
  return lines


def _section(out_dir: str, name: str, probe: dict, label: str, png: str | None, *,
             own_csv: bool) -> list[str]:
  """A probe's section: protocol and metric in words, its plot (png: the path written, if any)
  and its CSV (own_csv: the probe is the evaluated model's, the one write_results writes)."""
  protocol, metric = probe.get("protocol", "?"), probe.get("metric", plots.value_key(probe))
  axes = ", ".join(f"{k} = {probe[k]}" for k in ("x", "y", "series") if probe.get(k))
  lines = [f"## {name}", "",
           f"- Protocol: `{protocol}`, {PROTOCOLS.get(protocol, 'as the probe defines it')}.",
           f"- Metric: `{metric}`, {METRICS.get(metric, 'as the probe defines it')}.",
           f"- Plot: {probe.get('plot')} ({axes}); {len(probe['rows'])} rows for {label}.", ""]
  stem = file_stem(name)
  if png is not None:
    lines += [f"![{name}]({epath.Path(png).name})", ""]
  if own_csv and (epath.Path(out_dir) / (stem + ".csv")).exists():
    lines += [f"Rows of {label}: [{stem}.csv]({stem}.csv)", ""]
  return lines


def write_plots(out_dir: str, models: Sequence[tuple[str, dict]]) -> list[str]:
  """out_dir/<probe>.png for each probe whose "plot" kind is known (plots.PLOTS) and that has
  rows, drawing every model that has the probe. Returns the paths."""
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  written = []
  for name in _probe_names(models):
    have = [(label, r) for label, r in models if name in r["probes"]]
    draw = plots.PLOTS.get(have[0][1]["probes"][name]["plot"])
    if draw is None or not any(r["probes"][name]["rows"] for _, r in have):
      continue  # a probe reported only as numbers, or nothing measured
    path = str(epath.Path(out_dir) / (file_stem(name) + ".png"))
    draw(path, [(label, r["probes"][name]) for label, r in have], name=name,
         train_length=[r.get("train_length") for _, r in have])
    written.append(path)
  return written


def write_report(out_dir: str, results: dict, compare: Sequence[dict] = ()) -> list[str]:
  """The PNGs (every plot draws `results` and each of `compare`) and out_dir/report.md: a
  header, the summary tables, one section per probe. report.md links only files that exist
  (the CSVs and results.json when write_results ran first). Returns every path written."""
  for i, r in enumerate([results, *compare]):
    _check(r, "results" if i == 0 else f"compare[{i - 1}]")
  all_results = [results, *compare]
  models = list(zip(_labels(all_results), all_results))
  written = write_plots(out_dir, models)
  lines = _header(models) + [""]
  if (epath.Path(out_dir) / RESULTS).exists():
    lines += [f"All results: [{RESULTS}]({RESULTS})", ""]
  lines += ["## Summary", ""]
  for table in summary_tables(models, results.get("train_length")):
    lines += [table, ""]
  for name in _probe_names(models):
    # the probe as the evaluated model has it; else the first compared model with it
    label, owner = next((label, r) for label, r in models if name in r["probes"])
    png = str(epath.Path(out_dir) / (file_stem(name) + ".png"))
    lines += _section(out_dir, name, owner["probes"][name], label,
                      png if png in written else None, own_csv=owner is results)
  path = epath.Path(out_dir) / REPORT
  path.write_text("\n".join(lines).rstrip() + "\n")
  return written + [str(path)]


def write_all(out_dir: str, results: dict, compare: Sequence[dict] = ()) -> list[str]:
  """write_results then write_report (so that report.md links the CSVs and results.json)."""
  return write_results(out_dir, results) + write_report(out_dir, results, compare)
