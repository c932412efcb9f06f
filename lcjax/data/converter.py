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

Two switches (DataConfig.anchor, DataConfig.continuous_positions; both off by default):
- anchor: every row starts with a shared anchor (AnchorAttention, arXiv 2411.13476) that
  models with `AttentionConfig.anchor` let every document see. The anchor is an empty document
  of its own: segment 1 at index 0, input BOS (the input every document starts with), target
  EOS (id 1 in every lcjax vocabulary: an empty document is just its end), position 0, loss
  weight 0; the packed documents follow as segments 2, 3, .... Being a document, it keeps every
  other rule of the contract (contiguous segments, inputs shifted within documents, padding),
  a model without anchor attention never sees it, and it weighs nothing in the loss ("tokens"
  or "documents"). Rows then hold at most L - 1 tokens of documents: the converter takes the
  task feature length as that budget and emits rows one token longer.
- continuous_positions: positions count the row's tokens (0..) instead of restarting per
  document (AnchorAttention's setting); padding keeps position 0.

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
ANCHOR_TARGET = 1  # EOS in every lcjax vocabulary (lcjax.data.vocab)
# The input every document starts with (its first target is predicted from it): the decoder
# BOS of the shift. Eval prompts and documents start with it too (lcjax.eval.suite.model_for).
BOS = 0


def _empty_row(anchor: bool):
  """A row before its first document: nothing, or the anchor (module doc)."""
  if anchor:
    values = {"targets": ANCHOR_TARGET, "loss_mask": 0, "segment_ids": 1, "positions": 0}
    return {k: tf.constant([values[k]], tf.int32) for k in _KEYS}
  return {k: tf.zeros([0], tf.int32) for k in _KEYS}


def pack(ds: tf.data.Dataset, length: int, *, anchor: bool = False,
         continuous_positions: bool = False) -> tf.data.Dataset:
  """Packs {"targets", "loss_mask"} documents (each <= length, or length - 1 with the anchor)
  into rows.

  Returns rows {targets, loss_mask, segment_ids, positions}, each int32 [length]; anchor and
  continuous_positions as in the module doc.
  """
  empty = _empty_row(anchor)
  start = tf.size(empty["targets"])  # tokens in a row without documents

  def step(row, doc):
    n = tf.size(doc["targets"])
    used = tf.size(row["targets"])
    # An empty document is the end-of-data sentinel: it only flushes.
    flush = tf.logical_or(used + n > length, tf.equal(n, 0))
    emitted = {k: tf.pad(v, [[0, length - used]]) for k, v in row.items()}
    base = tf.cond(flush, lambda: empty, lambda: row)
    segment = tf.reduce_max(tf.concat([base["segment_ids"], [0]], 0)) + 1
    first = tf.size(base["targets"]) if continuous_positions else 0
    new_row = {
        "targets": tf.concat([base["targets"], doc["targets"]], 0),
        "loss_mask": tf.concat([base["loss_mask"], doc["loss_mask"]], 0),
        "segment_ids": tf.concat([base["segment_ids"], tf.fill([n], segment)], 0),
        "positions": tf.concat([base["positions"], tf.range(first, first + n)], 0),
    }
    return new_row, (emitted, tf.logical_and(flush, used > start))

  sentinel = tf.data.Dataset.from_tensors(
      {"targets": tf.zeros([0], tf.int32), "loss_mask": tf.zeros([0], tf.int32)}
  )
  docs = ds.map(lambda ex: {"targets": ex["targets"], "loss_mask": ex["loss_mask"]})
  rows = docs.concatenate(sentinel).scan(empty, step)
  rows = rows.filter(lambda row, emit: emit).map(lambda row, emit: row)
  return rows.map(lambda row: {k: tf.ensure_shape(v, [length]) for k, v in row.items()})


class MaskedLMFeatureConverter(seqio.FeatureConverter):
  """Decoder-only LM converter that keeps a per-token loss mask. Always packs.

  anchor, continuous_positions: the switches of the module doc. With the anchor, rows are one
  token longer than the task feature length (the documents' budget).
  """

  TASK_FEATURES = {"targets": Spec(tf.int32), "loss_mask": Spec(tf.int32)}
  MODEL_FEATURES = {
      "inputs": Spec(tf.int32),
      "targets": Spec(tf.int32),
      "loss_weights": Spec(tf.float32),
  }
  PACKING_FEATURE_DTYPES = {"segment_ids": tf.int32, "positions": tf.int32}

  def __init__(self, *args, anchor: bool = False, continuous_positions: bool = False,
               **kwargs):
    super().__init__(*args, **kwargs)
    self.anchor, self.continuous_positions = anchor, continuous_positions

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
    length = self.get_model_feature_lengths(task_feature_lengths)["targets"]
    return pack(ds, length, anchor=self.anchor,
                continuous_positions=self.continuous_positions).map(self._convert_example)

  def get_model_feature_lengths(self, task_feature_lengths):
    length = task_feature_lengths["targets"] + int(self.anchor)
    return {k: length for k in [*self.MODEL_FEATURES, *self.PACKING_FEATURE_DTYPES]}
