"""seqio FeatureConverter: documents -> packed rows in the lcjax batch contract.

Task features (one document, or one window of a long document, each):
  targets   int32 [T]  token ids (EOS at the document's end), T <= L
  loss_mask int32 [T]  1 = loss target, 0 = not
Model features (one packed row each, L = sequence_length):
  inputs       int32 [L]  targets shifted right by one within each document
  targets      int32 [L]
  loss_weights float32 [L]  1.0 on loss targets, 0.0 elsewhere (incl. padding)
  segment_ids  int32 [L]  1.. = document within the row, 0 = padding
  positions    int32 [L]  restart at 0 per document

Packing is greedy in arrival order, the rule seqio's own tf-op packer uses:
a document joins the current row if it fits, else the row is emitted and a
new one started. We implement it with `Dataset.scan` instead of
`seqio.utils.trim_and_pack_dataset` because that helper packs groups of L
documents at a time and then unbatches them, so a tf.data iterator checkpoint
carries up to a whole group of packed rows (megabytes) and the first batch
waits for L documents. With scan, the checkpoint carries one partial row.
"""
import seqio
import tensorflow as tf

Spec = seqio.FeatureConverter.FeatureSpec
_KEYS = ("targets", "loss_mask", "segment_ids", "positions")


def _empty_row():
  return {k: tf.zeros([0], tf.int32) for k in _KEYS}


def pack(ds: tf.data.Dataset, length: int) -> tf.data.Dataset:
  """Packs {"targets", "loss_mask"} documents (each <= length) into rows.

  Returns rows {targets, loss_mask, segment_ids, positions}, each int32 [length].
  """

  def step(row, doc):
    n = tf.size(doc["targets"])
    used = tf.size(row["targets"])
    # An empty document is the end-of-data sentinel: it only flushes.
    flush = tf.logical_or(used + n > length, tf.equal(n, 0))
    emitted = {k: tf.pad(v, [[0, length - used]]) for k, v in row.items()}
    base = tf.cond(flush, _empty_row, lambda: row)
    segment = tf.reduce_max(tf.concat([base["segment_ids"], [0]], 0)) + 1
    new_row = {
        "targets": tf.concat([base["targets"], doc["targets"]], 0),
        "loss_mask": tf.concat([base["loss_mask"], doc["loss_mask"]], 0),
        "segment_ids": tf.concat([base["segment_ids"], tf.fill([n], segment)], 0),
        "positions": tf.concat([base["positions"], tf.range(n)], 0),
    }
    return new_row, (emitted, tf.logical_and(flush, used > 0))

  sentinel = tf.data.Dataset.from_tensors(
      {"targets": tf.zeros([0], tf.int32), "loss_mask": tf.zeros([0], tf.int32)}
  )
  docs = ds.map(lambda ex: {"targets": ex["targets"], "loss_mask": ex["loss_mask"]})
  rows = docs.concatenate(sentinel).scan(_empty_row(), step)
  rows = rows.filter(lambda row, emit: emit).map(lambda row, emit: row)
  return rows.map(lambda row: {k: tf.ensure_shape(v, [length]) for k, v in row.items()})


class MaskedLMFeatureConverter(seqio.FeatureConverter):
  """Decoder-only LM converter that keeps a per-token loss mask. Always packs."""

  TASK_FEATURES = {"targets": Spec(tf.int32), "loss_mask": Spec(tf.int32)}
  MODEL_FEATURES = {
      "inputs": Spec(tf.int32),
      "targets": Spec(tf.int32),
      "loss_weights": Spec(tf.float32),
  }
  PACKING_FEATURE_DTYPES = {"segment_ids": tf.int32, "positions": tf.int32}

  def _convert_example(self, row):
    return {
        "inputs": seqio.utils.make_autoregressive_inputs(
            row["targets"], sequence_id=row["segment_ids"], bos_id=self.bos_id
        ),
        "targets": row["targets"],
        "loss_weights": tf.cast(row["loss_mask"], tf.float32),  # 0 on padding
        "segment_ids": row["segment_ids"],
        "positions": row["positions"],
    }

  def _convert_features(self, ds, task_feature_lengths):
    if not self.pack:
      raise ValueError("MaskedLMFeatureConverter only supports pack=True.")
    return pack(ds, task_feature_lengths["targets"]).map(self._convert_example)

  def get_model_feature_lengths(self, task_feature_lengths):
    length = task_feature_lengths["targets"]
    return {k: length for k in [*self.MODEL_FEATURES, *self.PACKING_FEATURE_DTYPES]}
