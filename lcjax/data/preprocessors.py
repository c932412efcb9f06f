"""seqio preprocessors: text segments -> token ids + per-token loss mask.

Every source yields {"segments": string [n], "loss": int32 [n]}: the document
split into n text pieces, each flagged 1 if its tokens are loss targets.
After `tokenize_segments` an example is
  {"targets": int32 [T], "loss_mask": int32 [T]}  (loss_mask 1 = loss target).
"""
import seqio
import tensorflow as tf


@seqio.map_over_dataset
def tokenize_segments(ex, output_features, eos_loss):
  """Tokenizes each segment and appends EOS, whose loss flag is `eos_loss`."""
  vocab = output_features["targets"].vocabulary
  n = ex["segments"].shape[0]  # static: the same for every example of a task
  ids, masks = [], []
  for i in range(n):
    piece = tf.cast(vocab.encode_tf(ex["segments"][i]), tf.int32)
    ids.append(piece)
    masks.append(tf.fill(tf.shape(piece), ex["loss"][i]))
  ids.append(tf.constant([vocab.eos_id], tf.int32))
  masks.append(tf.constant([int(eos_loss)], tf.int32))
  return {"targets": tf.concat(ids, 0), "loss_mask": tf.concat(masks, 0)}


def check_fits(ds, sequence_length):
  """Fails loudly (instead of seqio silently trimming off the answer)."""
  length = sequence_length["targets"]

  def check(ex):
    tf.debugging.assert_less_equal(
        tf.size(ex["targets"]),
        length,
        message=(
            "A synthetic example is longer than DataConfig.sequence_length "
            "tokens and would lose its answer. Fix: raise sequence_length or "
            "shorten the task (PasskeyConfig.prompt_bytes, MqarConfig.num_pairs)."
        ),
    )
    return ex

  return ds.map(check)
