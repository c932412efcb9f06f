"""The suite end to end on a tiny random hybrid: every probe runs under both protocols where it
has them, the rows cover the cells asked for, and the report writes every file it promises."""

import dataclasses
import json
import os
import re
import types

import jax
import pytest
from flax import nnx

from lcjax.data.pipeline import DataConfig, vocabulary
from lcjax.errors import ConfigError
from lcjax.eval import report, suite
from lcjax.models.lm import LM
from lcjax.parallel.mesh import MeshConfig
from lcjax.run import Run, TrainConfig, build
from lcjax.train.optim import OptimConfig
from lcjax.train.state import model_skeleton
from tests.parallel.test_sequence_model import CFG as HYBRID

CFG = dataclasses.replace(HYBRID, vocab_size=384, pattern="M*-", init_std=0.5)
TRAIN_LEN = 128


@pytest.fixture(scope="module")
def model():
  run = Run(CFG, DataConfig(sequence_length=TRAIN_LEN), TrainConfig(batch_size=8),
            OptimConfig(), MeshConfig(data=1))
  with pytest.MonkeyPatch.context() as mp:
    devices = jax.devices()
    mp.setattr("lcjax.parallel.mesh.jax.devices", lambda: devices[:1])
    setup = build(run)
  params = nnx.to_pure_dict(nnx.state(LM(CFG, rngs=nnx.Rngs(0)), nnx.Param))
  return suite.model_for(setup, run, params, model_skeleton(CFG)[0], vocabulary(run.data),
                         rows=8)


PROBES = {
    "niah_grid": suite.NiahGrid(depths=(0.0, 1.0), samples=2),
    "niah_tf": suite.NiahGrid(lengths=(128, 256), depths=(0.5,), samples=2,
                              protocol="teacher_forced"),
    "ruler": suite.Ruler(tasks=("niah_single", "variable_tracking"), lengths=(1024,),
                         samples=1),
    "phonebook": suite.Phonebook(entries=(2, 4), samples=2),
    "mqar": suite.Mqar(pairs=(2,), lengths=(128,), samples=2),
    "ppl_by_position": suite.PplByPosition(documents=2, buckets=4),
}


@pytest.fixture(scope="module")
def results(model):
  return {"model": "tiny", "step": 0, "checkpoint": "none", "train_length": TRAIN_LEN,
          "probes": {name: probe.run(model) for name, probe in PROBES.items()}}


def test_probes_fill_their_cells(results):
  probes = results["probes"]
  cells = {(r["length"], r["depth"]) for r in probes["niah_grid"]["rows"]}
  assert cells == {(n, d) for n in (128, 256, 512) for d in (0.0, 1.0)}  # 1x, 2x, 4x
  assert probes["niah_grid"]["protocol"] == "generate"
  assert probes["niah_tf"]["protocol"] == "teacher_forced"
  assert {r["task"] for r in probes["ruler"]["rows"]} == {"niah_single", "variable_tracking"}
  assert [r["entries"] for r in probes["phonebook"]["rows"]] == [2, 4]
  assert probes["mqar"]["rows"][0]["n"] == 2 * 2  # every query of both examples
  for name, probe in probes.items():
    key = "loss" if probe["plot"] == "curve" else "score"
    assert all(0.0 <= r[key] <= (100.0 if key == "loss" else 1.0) for r in probe["rows"]), name
  lengths = {r["length"] for r in probes["ppl_by_position"]["rows"]}
  assert lengths == {128, 256, 512}


def test_report_writes_every_promised_file(results, tmp_path):
  written = report.write_all(str(tmp_path), results, compare=[dict(results, model="other")])
  names = {os.path.basename(p) for p in written}
  for name in PROBES:
    assert {f"{name}.csv", f"{name}.png"} <= names, name
  assert {"results.json", "report.md"} <= names
  for path in written:
    assert os.path.getsize(path) > 0
    if path.endswith(".png"):
      with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  md = (tmp_path / "report.md").read_text()
  links = re.findall(r"\]\(([^)]+)\)", md)
  assert links and all((tmp_path / link).exists() for link in links)
  assert json.loads((tmp_path / "results.json").read_text())["probes"].keys() == PROBES.keys()


def test_in_loop_scalars_name_probe_and_cell(results):
  scalars = report.scalars({"niah_grid": results["probes"]["niah_grid"],
                            "ruler": results["probes"]["ruler"]})
  assert set(scalars) == {"suite/niah_grid/length=128", "suite/niah_grid/length=256",
                          "suite/niah_grid/length=512",
                          "suite/ruler/task=niah_single/length=1024",
                          "suite/ruler/task=variable_tracking/length=1024"}


def test_unknown_probe_and_protocol_are_config_errors():
  with pytest.raises(ConfigError, match="unknown probes \\['niah'\\]"):
    suite.EvalConfig(suite=("niah",))
  with pytest.raises(ConfigError, match="NiahGrid.protocol"):
    suite.NiahGrid(protocol="beam")


def test_prompts_and_documents_are_read_after_bos_as_in_training(monkeypatch):
  """Every training document's first input is converter.BOS (the batch contract); the probes'
  Model puts it before every prompt and document, for generation and teacher forcing alike."""
  from lcjax.data.converter import BOS

  seen = {}
  monkeypatch.setattr(suite, "greedy_generate",
                      lambda graphdef, params, prompts, **kw: seen.update(gen=prompts) or [[1]])
  monkeypatch.setattr(suite.teacher_forced, "score_answers",
                      lambda step, params, pairs, *a: seen.update(score=pairs) or [])
  monkeypatch.setattr(suite.teacher_forced, "ppl_by_position",
                      lambda step, params, docs, *a: seen.update(ppl=docs) or [])
  setup = types.SimpleNamespace(eval_step_at=lambda n: None)
  run = types.SimpleNamespace(data=types.SimpleNamespace(sequence_length=8))
  vocab = types.SimpleNamespace(eos_id=1, decode=lambda ids: "")
  model = suite.model_for(setup, run, {}, None, vocab, rows=2)
  model.generate([[5, 6]], 3)
  model.score([([5, 6], [7, 1])], 8)
  model.loss_by_position([[5, 6, 7]], 2, 1)
  assert seen == {"gen": [[BOS, 5, 6]], "score": [([BOS, 5, 6], [7, 1])],
                  "ppl": [[BOS, 5, 6, 7]]}
