"""lcjax.eval.report and plots: every promised file is written, valid and linked; the CSVs hold
the rows; the summary holds the means; bad results files fail with a clear error."""

import csv
import json
import math
import os
import re

import matplotlib.image
import numpy as np
import pytest

from lcjax.eval import plots, report

LENGTHS = (256, 512)
DEPTHS = (0.0, 0.5, 1.0)
TASKS = ("niah_single", "vt")


def synthetic_results(model: str, step: int, shift: float) -> dict:
  """All plot kinds over two lengths; scores fall with length and depth, minus `shift`."""
  def score(i, j=0):
    return round(max(0.0, 1.0 - 0.25 * i - 0.1 * j - shift), 4)
  niah = [{"length": n, "depth": d, "score": score(i, j), "n": 4}
          for i, n in enumerate(LENGTHS) for j, d in enumerate(DEPTHS)]
  ruler = [{"task": t, "length": n, "score": score(i, k), "n": 4, "extra": f"{t}-{n}"}
           for k, t in enumerate(TASKS) for i, n in enumerate(LENGTHS)]
  phonebook = [{"entries": e, "length": 24 * e, "score": score(i), "n": 4}
               for i, e in enumerate((8, 16, 64))]
  mqar = [{"pairs": p, "length": n, "score": score(i, k), "n": 8}
          for k, p in enumerate((4, 8)) for i, n in enumerate(LENGTHS)]
  ppl = [{"length": n, "position_start": lo, "position_end": hi, "position": (lo + hi) / 2,
          "loss": 5.0 - 0.5 * math.log2(hi) + shift, "tokens": 8 * (hi - lo)}
         for n in LENGTHS for lo, hi in ((0, 1), (1, 16), (16, 128), (128, n))]
  gen, tf = "generate", "teacher_forced"
  return {"model": model, "step": step, "checkpoint": f"{model}/checkpoints/{step}",
          "train_length": 256, "probes": {
              "niah_grid": {"protocol": gen, "metric": "string_match_all", "plot": "heatmap",
                            "x": "length", "y": "depth", "rows": niah},
              "ruler": {"protocol": gen, "metric": "string_match_all", "plot": "lines",
                        "x": "length", "series": "task", "rows": ruler},
              "phonebook": {"protocol": gen, "metric": "exact_match", "plot": "lines",
                            "x": "entries", "series": None, "rows": phonebook},
              "mqar": {"protocol": tf, "metric": "exact_match", "plot": "lines",
                       "x": "length", "series": "pairs", "rows": mqar},
              "ppl_by_position": {"protocol": tf, "metric": "loss", "plot": "curve",
                                  "x": "position", "series": "length", "rows": ppl}}}


def assert_png(path):
  with open(path, "rb") as f:
    assert f.read(4) == b"\x89PNG", path
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[2] in (3, 4), (path, image.shape)
  assert 100 <= image.shape[0] <= 2000 and 100 <= image.shape[1] <= 3000, (path, image.shape)


def test_write_all_writes_every_promised_file_and_links_only_existing_ones(tmp_path):
  results = synthetic_results("runs/demo", 1400, 0.0)
  other = synthetic_results("runs/other", 700, 0.2)
  written = report.write_all(str(tmp_path), results, compare=[other])
  names = list(results["probes"])
  expected = {"results.json", "report.md"} | {f"{n}.csv" for n in names}
  expected |= {f"{n}.png" for n in names}
  assert {os.path.basename(p) for p in written} == expected
  assert all(os.path.isfile(p) for p in written)
  for name in names:
    assert_png(tmp_path / f"{name}.png")
  text = (tmp_path / "report.md").read_text()
  links = re.findall(r"\]\(([^)]+)\)", text)
  assert set(links) == expected - {"report.md"}
  assert all((tmp_path / link).is_file() for link in links)
  for key in ("runs/demo", "runs/other", "1400", "runs/demo/checkpoints/1400", "256"):
    assert key in text.split("## Summary")[0]
  assert "teacher-forced" in text and "greedy decoding" in text


def test_report_without_results_json_links_no_csv(tmp_path):
  written = report.write_report(str(tmp_path), synthetic_results("a", 1, 0.0))
  assert os.path.basename(written[-1]) == "report.md" and len(written) == 6
  links = re.findall(r"\]\(([^)]+)\)", (tmp_path / "report.md").read_text())
  assert links and all(link.endswith(".png") for link in links)
  assert all((tmp_path / link).is_file() for link in links)


def table_cells(text: str, first: str) -> list[list[str]]:
  """The cells of the summary table rows whose first cell is `first`."""
  rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
  return [[c.strip() for c in row] for row in rows if row[0].strip() == first]


def test_summary_table_holds_the_means_per_length(tmp_path):
  results = synthetic_results("runs/demo", 1400, 0.0)
  other = synthetic_results("runs/other", 700, 0.2)
  report.write_report(str(tmp_path), results, compare=[other])
  text = (tmp_path / "report.md").read_text()
  head = table_cells(text, "probe")[0]
  assert head[:3] == ["probe", "model", "metric"] and head[-1] == "all"
  assert head[3:5] == ["256", "512*"]  # past the training length
  assert "\\* longer than the training length (256)." in text
  column = {v: head.index(str(v) + "*" * (v > 256)) for v in LENGTHS}
  for r, label in ((results, "runs/demo"), (other, "runs/other")):
    niah = [row for row in table_cells(text, "niah_grid") if row[1] == label]
    assert len(niah) == 1
    for n in LENGTHS:
      mean = np.mean([x["score"] for x in r["probes"]["niah_grid"]["rows"] if x["length"] == n])
      assert niah[0][column[n]] == f"{mean:.2f}"
    ruler = [row for row in table_cells(text, "ruler · task=vt") if row[1] == label]
    vt = [x["score"] for x in r["probes"]["ruler"]["rows"] if x["task"] == "vt"]
    assert ruler[0][column[512]] == f"{vt[1]:.2f}" and ruler[0][-1] == f"{np.mean(vt):.2f}"
    ppl = [row for row in table_cells(text, "ppl_by_position") if row[1] == label][0]
    rows = [x for x in r["probes"]["ppl_by_position"]["rows"] if x["length"] == 512]
    loss = sum(x["loss"] * x["tokens"] for x in rows) / sum(x["tokens"] for x in rows)
    assert ppl[column[512]] == f"{loss:.2f}"
  entries = table_cells(text, "phonebook")[0]
  assert entries[-4:] == ["1.00", "0.75", "0.50", "0.75"]  # entries 8, 16, 64, then all


def test_csv_round_trips_the_rows_and_json_the_results(tmp_path):
  results = synthetic_results("runs/demo", 1400, 0.0)
  results["probes"]["ruler"]["rows"][0]["score"] = np.float32(0.5)  # numpy scalars are saved
  report.write_results(str(tmp_path), results)
  for name, probe in results["probes"].items():
    with open(tmp_path / f"{name}.csv", newline="") as f:
      read = list(csv.DictReader(f))
    assert len(read) == len(probe["rows"])
    for row, got in zip(probe["rows"], read):
      assert {k: str(v) for k, v in row.items()} == {k: got[k] for k in row}, name
    if probe["plot"] == "curve":
      assert float(read[0]["ppl"]) == pytest.approx(math.exp(float(read[0]["loss"])))
  loaded = report.load_results(str(tmp_path))
  assert loaded == json.loads(json.dumps(results, default=float))
  assert report.load_results(str(tmp_path / "results.json")) == loaded


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "top level is a list"),
    ('{"model": "m"}', '"probes"'),
    ('{"probes": {"niah_grid": {"plot": "heatmap", "x": "length", "rows": []}}}',
     'probe "niah_grid" lacks y'),
    ('{"probes": {"p": {"plot": "lines", "x": "length"}}}', 'probe "p" lacks rows'),
])
def test_load_results_names_the_path_and_what_is_wrong(tmp_path, content, message):
  path = tmp_path / "results.json"
  if content is not None:
    path.write_text(content)
  with pytest.raises(ValueError, match=re.escape(message)) as info:
    report.load_results(str(path))
  assert str(path) in str(info.value)


def test_load_results_of_a_directory_without_results(tmp_path):
  with pytest.raises(ValueError, match="directory without results.json") as info:
    report.load_results(str(tmp_path))
  assert str(tmp_path) in str(info.value)


def test_heatmap_image_is_uint8_rgb():
  probe = synthetic_results("m", 1, 0.0)["probes"]["niah_grid"]
  image = plots.heatmap_image(probe, train_length=256, name="niah_grid")
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  assert image.shape[0] >= 100 and image.shape[1] >= 100
  assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10  # drawn, not blank


def test_probes_without_a_plot_or_rows_get_a_section_but_no_png(tmp_path):
  results = synthetic_results("m", 1, 0.0)
  results["probes"]["table_only"] = {"protocol": "generate", "metric": "exact_match",
                                     "plot": None, "x": "length",
                                     "rows": [{"length": 256, "score": 0.5, "n": 2}]}
  results["probes"]["ruler"]["rows"] = []
  written = {os.path.basename(p) for p in report.write_all(str(tmp_path), results)}
  assert "table_only.csv" in written and "table_only.png" not in written
  assert "ruler.csv" in written and "ruler.png" not in written
  text = (tmp_path / "report.md").read_text()
  assert "## table_only" in text and "## ruler" in text
  assert table_cells(text, "table_only")[0][-3:] == ["0.50", "-", "0.50"]  # 256, 512, all
  assert all((tmp_path / link).is_file() for link in re.findall(r"\]\(([^)]+)\)", text))


def test_plots_draw_on_given_axes_depth_at_the_top_and_log2_when_x_spans_more_than_4x():
  from matplotlib.figure import Figure
  probes = synthetic_results("m", 1, 0.0)["probes"]
  fig = Figure()
  heat, ruler, phonebook = fig.subplots(1, 3)
  plots.heatmap(heat, [("m", probes["niah_grid"])], name="niah_grid", train_length=256)
  bottom, top = heat.get_ylim()
  assert bottom > top and heat.get_yticklabels()[0].get_text() == "0"
  assert [t.get_text() for t in heat.get_xticklabels()] == ["256", "512"]
  plots.lines(ruler, [("m", probes["ruler"])], name="ruler", train_length=256)
  plots.lines(phonebook, [("m", probes["phonebook"])], name="phonebook")
  assert ruler.get_xscale() == "linear" and phonebook.get_xscale() == "log"
  assert ruler.get_title() == "ruler: string_match_all (generate)"
  assert len(ruler.get_lines()) == len(TASKS) + 1  # one per task, the train length


def test_numpy_values_sort_as_numbers_and_an_empty_compared_probe_still_plots(tmp_path):
  from matplotlib.figure import Figure
  probe = synthetic_results("m", 1, 0.0)["probes"]["niah_grid"]
  probe["rows"] = [{**r, "length": np.int64(r["length"] * 4 if r["length"] == 512 else 256)}
                   for r in probe["rows"]]  # lengths 256 and 2048: text order would swap them
  empty = {**probe, "rows": []}
  heat, other = Figure().subplots(1, 2)
  plots.heatmap([heat, other], [("m", probe), ("e", empty)], train_length=[256, None])
  assert [t.get_text() for t in heat.get_xticklabels()] == ["256", "2048"]
  results = {"model": "m", "probes": {"niah_grid": probe}}
  written = report.write_all(str(tmp_path), results, compare=[{"probes": {"niah_grid": empty}}])
  assert str(tmp_path / "niah_grid.png") in written
  assert table_cells((tmp_path / "report.md").read_text(), "niah_grid")[0][3:5] == ["0.90", "0.65"]


def test_labels_of_compared_runs_are_unique():
  runs = [{"model": "a", "step": 1}, {"model": "a", "step": 2}, {"model": "b"},
          {"model": "a", "step": 2}, {}]
  assert report._labels(runs) == ["a @1", "a @2 #1", "b", "a @2 #3", "model 4"]
