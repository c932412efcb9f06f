"""Variable sequence length training: Dataset Decomposition (Pouransari et al., arXiv 2405.13226).

Instead of packing documents into rows of one length, every document is cut into pieces whose
lengths are powers of two, and each piece becomes a row of its own in the bucket of its length:

    a document of n tokens -> n // max pieces of `max`, then one piece per set bit of
    n % max (largest first, from the front), dropping bits below `min`.

A batch comes from one bucket and holds a constant number of tokens (more rows when rows are
shorter), so attention never crosses documents and a step costs what its documents cost.
Which bucket each step reads follows the reference's sampling (apple/ml-dataset-decomposition:
per-bucket odds among the buckets not yet used up in the current cycle): bucket k is picked
with probability proportional to `batches_k * odds_k` among those with batches left, where
batches_k is the bucket's share of a cycle's steps (its share of the data's tokens). Odds that
favour short buckets (DD's "Pow-2": 2^(K-1-k)) use them up first, so each cycle grows from
short to long rows; equal odds mix all lengths throughout.

The order of buckets is a pure function of (odds, shares, steps, cycles, seed), so an iterator
checkpoint (tf.data's own, as for packed batches) resumes exactly. Each length is one jit
compile of the train step, not one per batch.
"""

import dataclasses

import numpy as np
import seqio
import tensorflow as tf

from lcjax.data.converter import MaskedLMFeatureConverter
from lcjax.errors import ConfigError

SHARE_SAMPLE_DOCUMENTS = 2048  # documents decomposed up front to measure each bucket's share


@dataclasses.dataclass(frozen=True)
class LengthBuckets:
  """Dataset Decomposition's buckets and curriculum (`DataConfig.length_buckets`,
  `bucket_odds`, `bucket_cycles`).

  lengths: the bucket lengths, powers of two, the longest equal to DataConfig.sequence_length
    (a batch of the longest bucket has TrainConfig.batch_size rows, a bucket half as long twice
    as many: every batch holds batch_size * sequence_length tokens).
  odds: per bucket (shortest first); None for DD's Pow-2 curriculum (2^(K-1-k): the shortest
    bucket 2^(K-1) times as likely as the longest); all equal for no curriculum.
  cycles: how many times the curriculum repeats over the run (DD trains with several).
  """
  lengths: tuple[int, ...] = ()
  odds: tuple[float, ...] | None = None
  cycles: int = 1

  def __post_init__(self):
    if any(n < 1 or n & (n - 1) for n in self.lengths) or list(self.lengths) != sorted(
        set(self.lengths)):
      raise ConfigError(f"DataConfig.length_buckets={self.lengths} must be distinct powers of "
                        "two in increasing order, e.g. (64, 128, 256).")
    if self.odds is not None and (len(self.odds) != len(self.lengths)
                                  or any(o <= 0 for o in self.odds)):
      raise ConfigError(f"DataConfig.bucket_odds={self.odds} needs one positive number per "
                        f"bucket ({len(self.lengths)}), shortest first; or None for Pow-2.")
    if self.cycles < 1:
      raise ConfigError(f"DataConfig.bucket_cycles={self.cycles} must be >= 1.")

  @property
  def bucket_odds(self) -> np.ndarray:
    if self.odds is not None:
      return np.asarray(self.odds, np.float64)
    return 2.0 ** np.arange(len(self.lengths) - 1, -1, -1)

  def check(self, sequence_length: int) -> None:
    """Fails unless the longest bucket is the row length the run is configured for."""
    if self.lengths and self.lengths[-1] != sequence_length:
      raise ConfigError(
          f"DataConfig.length_buckets={self.lengths} must end at DataConfig.sequence_length="
          f"{sequence_length} (the longest rows, TrainConfig.batch_size of them per batch): "
          "set the longest bucket to sequence_length or change sequence_length.")


def piece_bounds(n: int, lengths: tuple[int, ...]) -> list[tuple[int, int]]:
  """[start, end) of the pieces a document of n tokens is cut into (the module doc), in order.

  Plain Python: the definition the tf.data version (`_pieces_of_length`) is tested against.
  """
  longest = lengths[-1]
  bounds, start = [], 0
  for _ in range(n // longest):
    bounds.append((start, start + longest))
    start += longest
  rest = n - start
  for length in reversed(lengths[:-1]):
    if rest & length:
      bounds.append((start, start + length))
      start += length
  return bounds  # bits of n that are no bucket's length are dropped: the document's tail


def _pieces_of_length(doc: dict, length: int, lengths: tuple[int, ...]) -> tf.data.Dataset:
  """The pieces of `doc` ({"targets", "loss_mask"} [n]) that are `length` long, as documents."""
  longest = lengths[-1]
  n = tf.size(doc["targets"])
  full = n // longest
  if length == longest:
    starts = tf.range(full) * longest
  else:
    rest = n - full * longest
    # Bits above `length` (of the buckets) come first: they fix where this piece starts.
    bits = lambda b: tf.bitwise.bitwise_and(rest, b)
    higher = sum(bits(other) for other in lengths[:-1] if other > length)
    has = tf.cast(tf.not_equal(bits(length), 0), tf.int32)
    starts = tf.repeat(full * longest + higher, has)
  return tf.data.Dataset.from_tensor_slices(starts).map(
      lambda s: {k: v[s:s + length] for k, v in doc.items()})


def bucket_shares(docs: tf.data.Dataset, lengths: tuple[int, ...],
                  sample: int = SHARE_SAMPLE_DOCUMENTS) -> np.ndarray:
  """Each bucket's share of the tokens, measured on the first `sample` documents."""
  tokens = np.zeros(len(lengths))
  for doc in docs.take(sample).as_numpy_iterator():
    for start, end in piece_bounds(len(doc["targets"]), lengths):
      tokens[lengths.index(end - start)] += end - start
  if not tokens.sum():
    raise ConfigError(f"No document of the training data is as long as the shortest bucket "
                      f"({lengths[0]} tokens): lower DataConfig.length_buckets.")
  return tokens / tokens.sum()


def bucket_order(shares: np.ndarray, odds: np.ndarray, steps: int, cycles: int,
                 seed: int) -> np.ndarray:
  """int32 [steps]: the bucket each step reads (the module doc's sampling).

  Each cycle holds ~steps/cycles batches, split over the buckets by their token shares
  (at least one batch for a bucket with any share); within it, a step picks bucket k with
  probability proportional to batches_k * odds_k among the buckets with batches left.
  """
  rng = np.random.default_rng(seed)
  order = []
  for cycle in range(cycles):
    size = steps // cycles + (cycle < steps % cycles)
    batches = np.floor(shares * size).astype(np.int64)
    batches[(shares > 0) & (batches == 0)] = 1
    for k in np.argsort(-(shares * size - np.floor(shares * size))):  # largest remainders
      if batches.sum() >= size:
        break
      batches[k] += 1
    weight, left = batches * odds, batches.copy()
    for _ in range(size):
      live = np.where(left > 0, weight, 0.0)
      k = rng.choice(len(live), p=live / live.sum())
      left[k] -= 1
      order.append(k)
  return np.asarray(order, np.int32)


def bucketed_batches(docs: tf.data.Dataset, buckets: LengthBuckets, *, batch_size: int,
                     steps: int, seed: int, normalize) -> tf.data.Dataset:
  """Batches of one bucket each, in `bucket_order`, from task documents (shuffled, repeated).

  batch_size: this process's rows for the longest bucket (a bucket 2^j times shorter has
  2^j times as many). normalize: applied to each bucket's dataset of batches.
  """
  lengths, longest = buckets.lengths, buckets.lengths[-1]
  converter = MaskedLMFeatureConverter()
  per_bucket = []
  for length in lengths:
    pieces = docs.flat_map(lambda doc, length=length: _pieces_of_length(doc, length, lengths))
    rows = converter(pieces, {"targets": length, "loss_mask": length})
    per_bucket.append(normalize(rows.batch(batch_size * (longest // length),
                                           drop_remainder=True)))
  order = bucket_order(bucket_shares(docs, lengths), buckets.bucket_odds, steps,
                       buckets.cycles, seed)
  choice = tf.data.Dataset.from_tensor_slices(tf.constant(order, tf.int64)).repeat()
  return tf.data.Dataset.choose_from_datasets(per_bucket, choice)


def task_documents(mixture: str, *, sequence_length: int, seed: int, shard_index: int,
                   num_shards: int) -> tf.data.Dataset:
  """The mixture's documents ({"targets", "loss_mask"}), shuffled and repeated, unpacked and
  untrimmed: a document longer than the longest bucket becomes several pieces, not one."""
  return seqio.get_dataset(
      mixture, task_feature_lengths={"targets": sequence_length, "loss_mask": sequence_length},
      feature_converter=seqio.PassThroughFeatureConverter(), dataset_split="train",
      shuffle=True, num_epochs=None,
      shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards), seed=seed,
      verbose=False, trim_output_features=False)


def make_bucketed_dataset(mixture: str, buckets: LengthBuckets, *, sequence_length: int,
                          batch_size: int, steps: int, seed: int, shard_index: int = 0,
                          num_shards: int = 1, normalize=None) -> tf.data.Dataset:
  """`bucketed_batches` of a seqio mixture's training documents (this process's share);
  normalize: None, or a map applied to every batch (the loss normalization)."""
  buckets.check(sequence_length)
  docs = task_documents(mixture, sequence_length=sequence_length, seed=seed,
                        shard_index=shard_index, num_shards=num_shards)
  return bucketed_batches(docs, buckets, batch_size=batch_size, steps=steps, seed=seed,
                          normalize=(lambda ds: ds) if normalize is None else
                          (lambda ds: ds.map(normalize)))
