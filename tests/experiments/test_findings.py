"""The findings' grids (experiments/<finding>.py): one cell of each, cut to one training step
and tiny evaluations, runs through the sweep tool, and the report states the claim and holds
the grid's figures and analysis. The full grids are not run here (minutes to half an hour
each on 2 cores); their reports are committed under experiments/results/."""
import os
import re

import pytest
from etils import epath

from lcjax.sweep import commands
from lcjax.sweep import grid as grids
from tests.train.runs import REPO

SMOKE = ["TrainConfig.steps = 1", "TrainConfig.checkpoint_every = 1", "TrainConfig.log_every = 1",
         "TrainConfig.eval_batches = 1", "PplByPosition.documents = 1",
         "PplByPosition.lengths = (64, 128)"]
# finding -> the cell to run (the one whose variants differ most from the base gin files)
FINDINGS = {"recall_needs_attention": "model=hybrid_task=4pairs_65tokens",
            "recall_phonebook": "model=hybrid_entries=4",
            "nope_extrapolation": "model=hybrid_nope_seed=0",
            "bf16_rope": "rope_dtype=bfloat16_attention=anchor",
            "rope_scaling": "method=yarn_ft",
            "rope_scaling_needle": "method=yarn_ft"}
# A finding's own cuts, for the variants that set their steps themselves (stages).
SMOKE_EXTRA = {"rope_scaling": ["long/Stage.steps = 1", "long/Stage.warmup_steps = 1",
                                "long/Stage.batch_size = 8",  # 8 fake devices
                                "PplByPosition.lengths = (64, 1024)"],  # the grid metric's
              # 2 steps everywhere: the base's two stages of 1, the fine-tune's one stage of 2.
              "rope_scaling_needle": [
                  "TrainConfig.steps = 2", "copying/Stage.steps = 1", "retrieval/Stage.steps = 1",
                  "long/Stage.steps = 2", "long/Stage.warmup_steps = 1",
                  "long/Stage.batch_size = 8",  # 8 fake devices
                  "NiahGrid.lengths = (256, 512)", "NiahGrid.depths = (0.5,)",
                  "NiahGrid.samples = 1"]}


def _path(name):
  return os.path.join(REPO, "experiments", f"{name}.py")


def _smoke_grid(tmp_path, name):
  """A grid file: the finding's grid with the smoke bindings appended to its own, its base's
  and every variant's (which come after its own)."""
  path = tmp_path / f"{name}_smoke.py"
  smoke = SMOKE + SMOKE_EXTRA.get(name, [])
  path.write_text(
      "import importlib.util\n\n\ndef get_config():\n"
      f"  spec = importlib.util.spec_from_file_location('g', {_path(name)!r})\n"
      "  module = importlib.util.module_from_spec(spec)\n  spec.loader.exec_module(module)\n"
      "  c = module.get_config()\n"
      f"  smoke = {smoke!r}\n"
      "  c.bindings = list(c.bindings) + smoke\n"
      "  if c.get('base', None) is not None:\n    c.base = list(c.base) + smoke\n"
      "  c.axes = [(n, {k: list(b) + smoke for k, b in v.items()} if hasattr(v, 'items') else v)\n"
      "            for n, v in c.axes]\n"
      "  return c\n")
  return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FINDINGS))
def test_one_cell_of_each_finding_runs_and_reports(tmp_path, name):
  path, root, out = _smoke_grid(tmp_path, name), str(tmp_path / "root"), str(tmp_path / "out")
  cell = grids.select(grids.expand(grids.load_grid(path)), name=FINDINGS[name])[0]
  states = commands.run(path, root, cell=cell.name, backend="cpu", say=lambda _: None)
  # (a grid's base trains first)
  assert states == {**({grids.BASE: "done"} if grids.BASE in states else {}), cell.name: "done"}, (
      open(os.path.join(root, cell.name, "sweep.log")).read())
  written = [os.path.basename(p) for p in commands.make_report(path, root, out=out)]
  report = open(os.path.join(out, "report.md")).read()
  grid = grids.load_grid(path)
  assert "## Claim and expected direction" in report and grid.claim[:40] in report
  for pattern, x_label in grid.get("figures", []):
    assert any(x_label.replace(" ", "_") in f for f in written), (pattern, written)
  if grid.get("analysis", None):  # its markdown is in the report, with any plot it links
    assert grid.analysis(epath.Path(out)).splitlines()[0] in report
    for png in re.findall(r"\]\(([^)]+\.png)\)", report):
      assert open(os.path.join(out, png), "rb").read(4) == b"\x89PNG"
  for png in [f for f in written if f.endswith(".png")]:
    assert open(os.path.join(out, png), "rb").read(4) == b"\x89PNG"
