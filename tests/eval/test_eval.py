"""lcjax.eval: exact match semantics, and the CLI path reproduces the loop's own eval."""

import json

import gin
import numpy as np

from lcjax.config import parse_gin
from lcjax.eval.__main__ import evaluate_checkpoint
from lcjax.eval.evaluate import exact_matches
from tests.train.runs import DEMO_GIN, bindings, read_jsonl, train_in_process


def test_exact_match_needs_every_answer_token_of_a_document():
  segment_ids = np.array([[1, 1, 1, 2, 2, 2, 0, 0]])
  loss_weights = np.array([[0, 1, 1, 0, 1, 1, 0, 0]], np.float32)
  correct = np.array([[0, 1, 1, 1, 1, 0, 1, 1]], bool)  # doc 1 right, doc 2 misses one
  batch = {"segment_ids": segment_ids, "loss_weights": loss_weights}
  assert exact_matches(correct, batch) == (1, 2)
  assert exact_matches(np.ones_like(correct), batch) == (2, 2)


def test_eval_cli_matches_the_training_loops_eval(tmp_path):
  b = bindings(TrainConfig__steps=4, TrainConfig__eval_every=4, TrainConfig__checkpoint_every=4)
  train_in_process(tmp_path, b)
  in_loop = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "eval/lcjax_passkey/loss" in r]
  gin.clear_config()
  try:
    parse_gin([DEMO_GIN], b)
    results = evaluate_checkpoint(str(tmp_path))
  finally:
    gin.clear_config()
  written = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert written["step"] == results["step"] == 4
  for key, value in in_loop[-1].items():
    if key.startswith("eval/"):
      np.testing.assert_allclose(written[key], value, rtol=1e-6, err_msg=key)
  assert "eval/lcjax_shakespeare/exact_match" not in written  # plain text has no answers
  assert 0.0 <= written["eval/lcjax_passkey/exact_match"] <= 1.0
