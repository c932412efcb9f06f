"""lcjax.eval: exact match semantics, and the CLI path reproduces the loop's own eval."""

import json
import re

import gin
import numpy as np
import pytest

from lcjax.config import parse_gin
from lcjax.errors import ConfigError
from lcjax.eval.__main__ import evaluate_checkpoint
from lcjax.eval.evaluate import exact_matches
from tests.train.runs import DEMO_GIN, bindings, read_jsonl, train_in_process

# The demo's probes, with fewer cells (the tiny model and the grid's shape are what is tested).
SMALL_SUITE = ["NiahGrid.depths = (0.0, 1.0)", "NiahGrid.samples = 2",
               "PplByPosition.documents = 2"]


def test_exact_match_needs_every_answer_token_of_a_document():
  segment_ids = np.array([[1, 1, 1, 2, 2, 2, 0, 0]])
  loss_weights = np.array([[0, 1, 1, 0, 1, 1, 0, 0]], np.float32)
  correct = np.array([[0, 1, 1, 1, 1, 0, 1, 1]], bool)  # doc 1 right, doc 2 misses one
  batch = {"segment_ids": segment_ids, "loss_weights": loss_weights}
  assert exact_matches(correct, batch) == (1, 2)
  assert exact_matches(np.ones_like(correct), batch) == (2, 2)


def test_eval_cli_matches_the_training_loops_eval_and_writes_the_report(tmp_path):
  b = bindings(TrainConfig__steps=4, TrainConfig__eval_every=4, TrainConfig__checkpoint_every=4)
  train_in_process(tmp_path, b)
  in_loop = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "eval/lcjax_passkey/loss" in r]
  gin.clear_config()
  try:
    parse_gin([DEMO_GIN], b + SMALL_SUITE)
    results = evaluate_checkpoint(str(tmp_path))
  finally:
    gin.clear_config()
  out = tmp_path / "eval" / "4"
  written = json.loads((out / "results.json").read_text())
  assert written["step"] == results["step"] == 4
  metrics = written["metrics"]
  for key, value in in_loop[-1].items():
    if key.startswith("eval/"):
      np.testing.assert_allclose(metrics[key], value, rtol=1e-6, err_msg=key)
  assert "eval/lcjax_shakespeare/exact_match" not in metrics  # plain text has no answers
  assert 0.0 <= metrics["eval/lcjax_passkey/exact_match"] <= 1.0
  # The demo's suite: the needle grid at 1x, 2x, 4x the training length, and loss by position.
  grid = written["probes"]["niah_grid"]["rows"]
  assert {r["length"] for r in grid} == {128, 256, 512}
  for name in ("niah_grid", "ppl_by_position"):
    with open(out / f"{name}.png", "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  report_md = (out / "report.md").read_text()
  links = re.findall(r"\]\(([^)]+)\)", report_md)
  assert "niah_grid.png" in links and all((out / link).exists() for link in links)


def test_in_loop_probes_log_scalars_and_the_heatmap(tmp_path):
  b = bindings(TrainConfig__steps=2, TrainConfig__eval_every=2, TrainConfig__checkpoint_every=2)
  train_in_process(tmp_path, b + [
      "EvalConfig.in_loop = ('niah_grid', 'ppl_by_position')",
      "in_loop/NiahGrid.lengths = (128, 256)", "in_loop/NiahGrid.depths = (0.0, 1.0)",
      "in_loop/NiahGrid.samples = 2", "in_loop/NiahGrid.protocol = 'teacher_forced'",
      "in_loop/PplByPosition.lengths = (128,)", "in_loop/PplByPosition.documents = 2"])
  (logged,) = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "eval/lcjax_passkey/loss" in r]
  for key in ("suite/niah_grid/length=128", "suite/niah_grid/length=256",
              "suite/ppl_by_position/length=128"):
    assert key in logged, sorted(logged)
  assert 0.0 <= logged["suite/niah_grid/length=256"] <= 1.0
  import tensorflow as tf  # reads TensorBoard's event files

  tags = {v.tag for path in (tmp_path / "tb").glob("events.*")
          for event in tf.compat.v1.train.summary_iterator(str(path))
          for v in event.summary.value if v.HasField("image")}
  assert tags == {"suite/niah_grid"}


def test_eval_attention_overrides_score_a_checkpoint_zero_shot(tmp_path):
  """EvalConfig.attention changes the evaluated model only: linear scaling by 1 scores exactly
  as the trained RoPE, by 4 differently; results.json and report.md name the override."""
  b = bindings(TrainConfig__steps=2, TrainConfig__eval_every=100, TrainConfig__checkpoint_every=2)
  b += ["AttentionConfig.position_encoding = 'rope'"]
  train_in_process(tmp_path, b)

  def evaluate(*extra):
    gin.clear_config()
    try:
      parse_gin([DEMO_GIN], b + list(extra))
      return evaluate_checkpoint(str(tmp_path), suite=["ppl_by_position"])
    finally:
      gin.clear_config()

  linear = lambda f: 'EvalConfig.attention = {"rope_scaling": {"rope_type": "linear", "factor": %s}}' % f
  trained, same, scaled = evaluate(), evaluate(linear(1.0)), evaluate(linear(4.0))
  key = "eval/lcjax_shakespeare/loss"
  assert same["metrics"][key] == trained["metrics"][key]
  # (a 2-step model barely uses position: any change at all shows the override reached it)
  assert scaled["metrics"][key] != trained["metrics"][key]
  assert "attention_overrides" not in trained
  written = json.loads((tmp_path / "eval" / "2" / "results.json").read_text())
  assert written["attention_overrides"]["rope_scaling"]["factor"] == 4.0
  assert '"factor": 4.0' in (tmp_path / "eval" / "2" / "report.md").read_text()
  with pytest.raises(ConfigError, match=r"EvalConfig.attention names \['rope_thetaa'\]"):
    evaluate('EvalConfig.attention = {"rope_thetaa": 1e6}')
