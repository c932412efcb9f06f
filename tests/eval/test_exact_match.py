"""Exact match is reported for the tasks registered as prompt -> answer, never inferred."""

import numpy as np

from lcjax.data import DataConfig
from lcjax.data.tasks import MQAR, PASSKEY, SHAKESPEARE, register_tasks
from lcjax.eval.evaluate import evaluate


def _batch(loss_weights):
  """One row, two documents and padding; weights as given."""
  segment_ids = np.array([[1, 1, 1, 2, 2, 2, 0, 0]], np.int32)
  return {"segment_ids": segment_ids, "targets": np.zeros_like(segment_ids),
          "loss_weights": np.array([loss_weights], np.float32)}


def _all_right(params, batch):
  return np.zeros(batch["targets"].shape, np.float32), np.ones(batch["targets"].shape, bool)


def test_exact_match_follows_the_task_declaration_not_the_weights():
  register_tasks(DataConfig())
  # A plain LM task whose data happens to leave some tokens unweighted (e.g. a masked header).
  partly_weighted = _batch([0, 1, 1, 0, 1, 1, 0, 0])
  fully_weighted = _batch([1, 1, 1, 1, 1, 1, 0, 0])
  results = evaluate(_all_right, None, {SHAKESPEARE: [partly_weighted],
                                        PASSKEY: [fully_weighted], MQAR: [partly_weighted]})
  assert f"eval/{SHAKESPEARE}/exact_match" not in results
  assert results[f"eval/{SHAKESPEARE}/token_accuracy"] == 1.0
  assert results[f"eval/{PASSKEY}/exact_match"] == 1.0
  assert results[f"eval/{MQAR}/exact_match"] == 1.0

