import numpy as np
import pytest
import tensorflow as tf

import lcjax.data as data
from lcjax.data import converter
from lcjax.data.pipeline import check_anchor
from lcjax.errors import ConfigError
from lcjax.models.attention import AttentionConfig
from lcjax.models.config import ModelConfig
from tests.data.helpers import check_contract
from tests.numerics import positions_of


def _docs(lengths_and_loss):
  docs = [
      {"targets": np.arange(3, 3 + n, dtype=np.int32), "loss_mask": np.full(n, w, np.int32)}
      for n, w in lengths_and_loss
  ]
  return tf.data.Dataset.from_generator(
      lambda: iter(docs),
      output_signature={k: tf.TensorSpec([None], tf.int32) for k in ("targets", "loss_mask")},
  )


def test_pack_small_example():
  ds = converter.MaskedLMFeatureConverter()(
      _docs([(3, 1), (2, 0), (4, 1), (6, 1)]), {"targets": 6, "loss_mask": 6}
  )
  rows = [{k: v.numpy() for k, v in r.items()} for r in ds]
  assert len(rows) == 3
  np.testing.assert_array_equal(rows[0]["targets"], [3, 4, 5, 3, 4, 0])
  np.testing.assert_array_equal(rows[0]["inputs"], [0, 3, 4, 0, 3, 0])
  np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 2, 2, 0])
  np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 0, 1, 0])
  np.testing.assert_array_equal(rows[0]["loss_weights"], [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(rows[1]["segment_ids"], [1, 1, 1, 1, 0, 0])
  # A document of exactly the row length fills a row; the last row is flushed.
  np.testing.assert_array_equal(rows[2]["segment_ids"], [1] * 6)
  np.testing.assert_array_equal(rows[2]["inputs"], [0, 3, 4, 5, 6, 7])


def test_train_batches_honour_contract():
  it = data.make_train_iterator(data.DataConfig(sequence_length=512), batch_size=8)
  for _ in range(4):
    check_contract(next(it), 8, 512)


def test_prompt_tokens_carry_no_loss():
  cfg = data.DataConfig(sequence_length=512)
  (batch,) = data.make_eval_batches(cfg, "lcjax_passkey", batch_size=4, num_batches=1)
  check_contract(batch, 4, 512)
  # Per document: 5 answer digits + EOS carry loss, nothing else.
  for row in range(4):
    seg = batch["segment_ids"][row]
    for s in np.unique(seg[seg > 0]):
      w = batch["loss_weights"][row][seg == s]
      assert w.sum() == 6 and np.all(w[-6:] == 1)


def _rows(docs, length, **switches):
  ds = converter.MaskedLMFeatureConverter(**switches)(
      _docs(docs), {"targets": length, "loss_mask": length})
  return [{k: v.numpy() for k, v in r.items()} for r in ds]


def test_pack_with_the_anchor():
  """The anchor is an empty document at index 0 (input BOS, target EOS, weight 0); the task
  length is the documents' budget, rows are one token longer."""
  rows = _rows([(3, 1), (2, 0), (4, 1), (5, 1)], 5, anchor=True)
  want = [  # (row, feature): values; the last document takes the whole budget
      (0, "targets", [1, 3, 4, 5, 3, 4]), (0, "inputs", [0, 0, 3, 4, 0, 3]),
      (0, "segment_ids", [1, 2, 2, 2, 3, 3]), (0, "positions", [0, 0, 1, 2, 0, 1]),
      (0, "loss_weights", [0, 1, 1, 1, 0, 0]), (1, "segment_ids", [1, 2, 2, 2, 2, 0]),
      (2, "segment_ids", [1, 2, 2, 2, 2, 2]), (2, "inputs", [0, 0, 3, 4, 5, 6]),
  ]
  assert len(rows) == 3
  for row, key, values in want:
    np.testing.assert_array_equal(rows[row][key], values, err_msg=f"row {row} {key}")


@pytest.mark.parametrize("anchor,want", [
    (False, [[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 0, 0]]),  # padding keeps 0
    (True, [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 0]]),
])
def test_continuous_positions(anchor, want):
  rows = _rows([(3, 1), (2, 0), (4, 1)], 6 - anchor, anchor=anchor, continuous_positions=True)
  np.testing.assert_array_equal([r["positions"] for r in rows], want)


def test_train_batches_with_the_anchor_and_continuous_positions():
  """Every row starts with the anchor, the only token of segment 1; positions count the row;
  the rest of the contract holds (with per-document positions); with "documents"
  normalization every document but the weightless anchor sums to 1."""
  cfg = data.DataConfig(sequence_length=512, anchor=True, continuous_positions=True,
                        loss_normalization="documents")
  batch = next(data.make_train_iterator(cfg, batch_size=4))
  seg = batch["segment_ids"]
  assert np.all(seg[:, 0] == 1) and np.all(seg[:, 1:] != 1)
  assert np.all(batch["targets"][:, 0] == converter.ANCHOR_TARGET)
  assert np.all(batch["inputs"][:, 0] == 0) and np.all(batch["loss_weights"][:, 0] == 0)
  np.testing.assert_array_equal(batch["positions"], np.where(seg > 0, np.arange(512), 0))
  check_contract({**batch, "positions": np.where(seg > 0, positions_of(seg), 0)}, 4, 512)
  for row in range(4):
    for s in np.unique(seg[row][seg[row] > 1]):
      assert np.isclose(batch["loss_weights"][row][seg[row] == s].sum(), 1.0), (row, s)


def test_anchor_attention_needs_anchored_rows():
  model = ModelConfig(attention=AttentionConfig(anchor=True))
  with pytest.raises(ConfigError, match="set DataConfig.anchor = True"):
    check_anchor(model, data.DataConfig())
  check_anchor(model, data.DataConfig(anchor=True))
  check_anchor(ModelConfig(), data.DataConfig())
  with pytest.raises(ConfigError, match="anchor needs sequence_length >= 2"):
    data.DataConfig(sequence_length=1, anchor=True)
