"""The sweep report's grid figures (a column pattern against its "*" values, one line per axis
value, averaged over seeds) and claim, on rows written here (no training)."""
import ml_collections
import numpy as np
import pytest
from etils import epath

from lcjax.errors import ConfigError
from lcjax.sweep import report


def _grid():
  c = ml_collections.ConfigDict()
  c.axes = [("ModelConfig.pattern", ["M-M-", "*-*-"]), ("seed", [0, 1])]
  return c


def _rows():
  score = {("M-M-", 4): 0.9, ("M-M-", 8): 0.5, ("M-M-", 16): 0.1,
           ("*-*-", 4): 1.0, ("*-*-", 8): 1.0, ("*-*-", 16): 0.8}
  rows = []
  for pattern in ("M-M-", "*-*-"):
    for seed in (0, 1):
      row = {"cell": f"{pattern}{seed}", "state": "done", "pattern": pattern, "seed": seed}
      row.update({f"suite/mqar/pairs={p}": score[pattern, p] + 0.1 * seed for p in (16, 4, 8)})
      rows.append(row)
  rows.append({"cell": "failed", "state": "failed", "pattern": "M-M-", "seed": 2,
               "suite/mqar/pairs=4": 123.0})  # a cell that is not done counts nowhere
  return rows


def test_a_pattern_gives_its_columns_by_x_sorted_as_numbers():
  assert list(report._pattern_columns(_rows(), "suite/mqar/pairs=*")) == ["4", "8", "16"]
  assert report._pattern_columns(_rows(), "suite/nope/*") == {}


def test_lines_average_over_seeds_per_axis_value(tmp_path):
  by_x = report._pattern_columns(_rows(), "suite/mqar/pairs=*")
  lines = report._lines(_grid(), _rows(), "pattern", "x", list(by_x),
                        lambda r, x: r.get(by_x[x]))
  mean, low, high = lines["pattern=M-M-"]
  np.testing.assert_allclose(mean, [0.95, 0.55, 0.15])
  np.testing.assert_allclose(low, [0.9, 0.5, 0.1])
  np.testing.assert_allclose(high, [1.0, 0.6, 0.2])
  np.testing.assert_allclose(lines["pattern=*-*-"][0], [1.05, 1.05, 0.85])


def test_figure_png_and_claim_in_the_markdown(tmp_path):
  path = epath.Path(tmp_path) / "mqar.png"
  report.plot_pattern(_grid(), _rows(), "suite/mqar/pairs=*", "pairs", path)
  assert path.read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(ConfigError, match="matches no column"):
    report.plot_pattern(_grid(), _rows(), "suite/other=*", "x", path)
  text = report.markdown(["cell", "pattern", "seed", "state", "step", "parameters"], _rows(),
                         "loss",
                         ["mqar.png"], claim="Attention recalls; SSMs forget.",
                         analysis="### A measurement without cells")
  assert text.index("## Claim and expected direction") < text.index("Attention recalls") < (
      text.index("## Measured")) < text.index("### A measurement") < text.index("![mqar.png]")
  assert "## Claim" not in report.markdown(["cell", "state", "step", "parameters"], _rows(),
                                           "loss", [])
