"""Train and eval batches for lcjax (the only entry points the trainer needs).

A batch is a dict of numpy arrays, each [batch, sequence_length]:
  inputs int32, targets int32, loss_weights float32, segment_ids int32,
  positions int32 (see converter.py for their meaning).
"""
import dataclasses

import gin
import numpy as np
import seqio
import tensorflow as tf

from lcjax.config import check_positive, check_types
from lcjax.data import buckets as buckets_lib
from lcjax.data import converter
from lcjax.data import mixtures as mixtures_lib
from lcjax.data import sources as sources_lib
from lcjax.data import tasks
from lcjax.data import tfds_source, tokenized  # noqa: F401  (register their sources with gin)
from lcjax.data.converter import MaskedLMFeatureConverter
from lcjax.data.vocab import vocabulary  # noqa: F401  (public re-export)
from lcjax.errors import ConfigError


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
  train_mixture: str = "lcjax_demo"  # seqio Task or Mixture name used for training
  eval_tasks: tuple[str, ...] = ("lcjax_shakespeare", "lcjax_passkey", "lcjax_mqar")
  sequence_length: int = 512  # packed row length
  # "byte", a SentencePiece .model file or a Hugging Face tokenizer.json (vocab.from_name)
  vocabulary: str = "byte"
  # Corpora of one's own (sources.py: @name/TextSource(), @name/JsonlSource(); tokenized.py:
  # @name/TokenSource(); tfds_source.py: @name/TfdsSource()), each a seqio task of its name.
  sources: tuple[sources_lib.Source, ...] = ()
  # Mixtures by token share (mixtures.py: @name/TokenShareMixture()), usable as train_mixture.
  mixtures: tuple[mixtures_lib.TokenShareMixture, ...] = ()
  seed: int = 0
  # How training weighs loss tokens: "tokens", each the same (a 256-token text window then
  # outweighs a 6-token answer 40 to 1), or "documents", each document's weights summing to
  # one (t5x's AVERAGE_PER_SEQUENCE), so every example counts the same whatever its length.
  loss_normalization: str = "tokens"
  # AnchorAttention's data (converter.py): every row starts with a shared anchor token, an empty
  # document of its own, leaving sequence_length - 1 tokens for documents (the tasks build their
  # documents for that length); models with AttentionConfig.anchor need it (`check_anchor`).
  anchor: bool = False
  # Positions count the row's tokens instead of restarting at 0 in every document.
  continuous_positions: bool = False
  # Dataset Decomposition (buckets.py): () packs rows of sequence_length; else the power-of-two
  # bucket lengths, the longest = sequence_length, each row one piece of one document, batches
  # of constant tokens. Odds per bucket (shortest first; None: DD's Pow-2) and cycles set the
  # curriculum.
  length_buckets: tuple[int, ...] = ()
  bucket_odds: tuple[float, ...] | None = None
  bucket_cycles: int = 1
  # Training batches tf.data prepares ahead, on its own threads, while the step runs (0: none).
  # The iterator state then holds them too (rows x length x 20 bytes each): exact, not smaller.
  prefetch_batches: int = 0

  def __post_init__(self):
    check_types(self)  # a wrong-typed gin binding fails here, naming it
    for field in ("sources", "mixtures"):  # gin gives lists
      object.__setattr__(self, field, tuple(getattr(self, field)))
    sources_lib.check_names([x.name for x in self.sources + self.mixtures],
                            tasks.TASKS + (tasks.DEMO,))
    check_positive(self, ("sequence_length",))  # before the tasks divide by it
    if self.prefetch_batches < 0:
      raise ConfigError(f"DataConfig.prefetch_batches={self.prefetch_batches} is negative.")
    if self.loss_normalization not in ("tokens", "documents"):
      raise ConfigError(f"DataConfig.loss_normalization={self.loss_normalization!r} is not "
                        "'tokens' or 'documents'.")
    if self.anchor and self.sequence_length < 2:
      raise ConfigError(f"DataConfig.anchor needs sequence_length >= 2 (the anchor and a "
                        f"token of a document), not {self.sequence_length}.")
    if self.length_buckets:
      self.buckets.check(self.sequence_length)
      if self.anchor or self.continuous_positions:
        raise ConfigError("DataConfig.length_buckets puts one piece of one document in each "
                          "row: DataConfig.anchor and continuous_positions do not apply; set "
                          "them to False or length_buckets = ().")

  @property
  def buckets(self) -> buckets_lib.LengthBuckets:
    return buckets_lib.LengthBuckets(self.length_buckets, self.bucket_odds, self.bucket_cycles)


def check_anchor(model_cfg, data_cfg: DataConfig) -> None:
  """Fails if the model uses anchor attention (ModelConfig.attention.anchor) on rows without
  an anchor: its documents would all see the first token of the row's first document."""
  if model_cfg.attention.anchor and not data_cfg.anchor:
    raise ConfigError("AttentionConfig.anchor = True needs rows that start with an anchor "
                      "token: set DataConfig.anchor = True (or AttentionConfig.anchor = False).")


class BatchIterator:
  """Numpy batches from a tf.data pipeline, with an exact, compact checkpoint.

  `state()` serializes the tf.data iterator itself (positions, plus whatever
  elements its buffers hold), so `restore()` is O(1): nothing is replayed.
  """

  def __init__(self, dataset: tf.data.Dataset):
    self._dataset = dataset
    self._iterator = iter(dataset)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in next(self._iterator).items()}

  def state(self) -> bytes:
    variant = tf.raw_ops.SerializeIterator(
        resource_handle=self._iterator._iterator_resource  # pylint: disable=protected-access
    )
    return tf.io.serialize_tensor(variant).numpy()

  def restore(self, state: bytes) -> None:
    tf.raw_ops.DeserializeIterator(
        resource_handle=self._iterator._iterator_resource,  # pylint: disable=protected-access
        serialized=tf.io.parse_tensor(state, tf.variant),
    )


def _register_tasks(cfg: DataConfig) -> dict[str, int]:
  """Registers the tasks for the documents of cfg's rows; returns their feature lengths."""
  length = cfg.sequence_length - int(cfg.anchor)  # the anchor takes a row's first token
  if cfg.anchor and vocabulary(cfg).eos_id != converter.ANCHOR_TARGET:
    raise ConfigError(f"DataConfig.anchor: the anchor's target is id {converter.ANCHOR_TARGET}"
                      f" (EOS in lcjax's byte and SentencePiece vocabularies), not EOS of "
                      f"{cfg.vocabulary!r}. Fix: set DataConfig.anchor = False with it.")
  task_cfg = dataclasses.replace(cfg, sequence_length=length)
  tasks.register_tasks(task_cfg)
  sources_lib.register_sources(task_cfg)
  return {"targets": length, "loss_mask": length}


def _converter(cfg: DataConfig) -> MaskedLMFeatureConverter:
  return MaskedLMFeatureConverter(anchor=cfg.anchor, bos_id=converter.BOS,
                                  continuous_positions=cfg.continuous_positions)


def _check_name(name: str, what: str, allow_mixture: bool) -> None:
  known = set(seqio.TaskRegistry.names())
  if allow_mixture:
    known |= set(seqio.MixtureRegistry.names())
  if name not in known:
    lcjax_names = sorted(n for n in known if n.startswith("lcjax_"))
    raise ConfigError(
        f"Unknown seqio {'task or mixture' if allow_mixture else 'task'} "
        f"{name!r} in DataConfig.{what}. Fix: use one of {lcjax_names} or "
        "register your own seqio Task before building the data."
    )


def _deterministic(ds: tf.data.Dataset) -> tf.data.Dataset:
  # Parallel maps must keep their order for iterator checkpoints to be exact.
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def make_train_iterator(
    cfg: DataConfig, batch_size: int, shard_index: int = 0, num_shards: int = 1,
    steps: int | None = None) -> BatchIterator:
  """Infinite, shuffled (cfg.seed) packed batches of cfg.train_mixture.

  batch_size is this process's rows per batch (of the longest rows, with length buckets);
  shard_index / num_shards pick this process's disjoint share of the examples. steps: how many
  batches the run takes, which the length-bucket curriculum spreads its cycles over.
  """
  lengths = _register_tasks(cfg)
  shard = seqio.ShardInfo(index=shard_index, num_shards=num_shards)
  for mixture in cfg.mixtures:  # rates from this process's examples
    mixtures_lib.register(mixture, lengths, cfg.seed, shard)
  _check_name(cfg.train_mixture, "train_mixture", allow_mixture=True)
  for mixture in cfg.mixtures:
    if mixture.name == cfg.train_mixture:
      mixtures_lib.report(mixture, lengths, cfg.seed, shard, batch_size)
  if cfg.length_buckets:
    if steps is None:
      raise ValueError("make_train_iterator with DataConfig.length_buckets needs `steps`.")
    normalize = per_document_weights if cfg.loss_normalization == "documents" else None
    return _train_iterator(cfg, buckets_lib.make_bucketed_dataset(
        cfg.train_mixture, cfg.buckets, sequence_length=cfg.sequence_length,
        batch_size=batch_size, steps=steps, seed=cfg.seed, shard_index=shard_index,
        num_shards=num_shards, normalize=normalize))
  ds = seqio.get_dataset(
      cfg.train_mixture,
      task_feature_lengths=lengths,
      feature_converter=_converter(cfg),
      dataset_split="train",
      shuffle=True,
      num_epochs=None,
      shard_info=shard,
      seed=cfg.seed,
      batch_size=batch_size,
      verbose=False,
  )
  if cfg.loss_normalization == "documents":
    ds = ds.map(per_document_weights)
  return _train_iterator(cfg, ds)


def _train_iterator(cfg: DataConfig, ds: tf.data.Dataset) -> BatchIterator:
  ds = _deterministic(ds)
  return BatchIterator(ds.prefetch(cfg.prefetch_batches) if cfg.prefetch_batches else ds)


def per_document_weights(batch: dict) -> dict:
  """Scales loss_weights `[rows, length]` so that each document's (row, segment) sum to 1."""
  weights, segments = batch["loss_weights"], batch["segment_ids"]
  rows, length = tf.shape(segments)[0], tf.shape(segments)[1]
  ids = segments + (length + 1) * tf.range(rows)[:, None]  # unique per (row, segment)
  totals = tf.math.unsorted_segment_sum(weights, ids, rows * (length + 1))
  return {**batch, "loss_weights": tf.math.divide_no_nan(weights, tf.gather(totals, ids))}


def _pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Pads a short final batch with all-padding rows (zeros everywhere)."""
  missing = rows - next(iter(batch.values())).shape[0]
  return {k: np.pad(v, [(0, missing), (0, 0)]) for k, v in batch.items()}


def make_eval_batches(
    cfg: DataConfig, task: str, batch_size: int, num_batches: int
) -> list[dict[str, np.ndarray]]:
  """The first num_batches packed batches of `task`'s validation split, in order.

  Fewer when the split runs out; a short last batch is padded to batch_size
  with all-padding rows (loss_weights 0) so every batch has the same shape.
  """
  lengths = _register_tasks(cfg)
  _check_name(task, "eval_tasks", allow_mixture=False)
  ds = seqio.get_dataset(
      task,
      task_feature_lengths=lengths,
      feature_converter=_converter(cfg),
      dataset_split="validation",
      shuffle=False,
      num_epochs=1,
      verbose=False,
  )
  ds = _deterministic(ds.batch(batch_size).take(num_batches))
  return [
      _pad_rows({k: v.numpy() for k, v in batch.items()}, batch_size)
      for batch in ds
  ]
