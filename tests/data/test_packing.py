import numpy as np
import tensorflow as tf

import lcjax.data as data
from lcjax.data import converter
from tests.data.helpers import check_contract


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
