"""seqio Task and Mixture registration for lcjax.

Tasks (all decoder-only, features described in preprocessors.py):
  lcjax_shakespeare  plays cut into sequence_length-token windows, loss everywhere (plain LM)
  lcjax_passkey      passkey retrieval, loss on the answer (passkey.py; prompt -> answer)
  lcjax_mqar         multi-query associative recall, loss on values (mqar.py; prompt -> answer)
  lcjax_copy         copying a random string, loss on the copy (copying.py; prompt -> answer)
  lcjax_phonebook    phonebook lookup, loss on the number (phonebook.py; prompt -> answer)
Mixture:
  lcjax_demo         all four, rates from MixtureRates (copy only with a rate > 0)

Sources are index streams gathered from constant tensors: shuffling is a
stateless permutation of indices per epoch (so seqio adds no shuffle buffer),
and a tf.data iterator checkpoint holds a counter, not buffered examples.
"""
import dataclasses
import functools

import gin
import numpy as np
import seqio
import tensorflow as tf

from lcjax.config import check_types
from lcjax.data import copying, mqar, passkey, phonebook, preprocessors, shakespeare, vocab
from lcjax.errors import ConfigError

SHAKESPEARE, PASSKEY, MQAR, COPY = "lcjax_shakespeare", "lcjax_passkey", "lcjax_mqar", "lcjax_copy"
PHONEBOOK = "lcjax_phonebook"
DEMO = "lcjax_demo"
TASKS = (SHAKESPEARE, PASSKEY, MQAR, COPY, PHONEBOOK)
SPLITS = ("train", "validation")

# Tasks registered as prompt -> answer (`register_task(..., answers=True)`): eval reports exact
# match (every answer token of a document right) for them; every other task is plain LM.
_ANSWER_TASKS: set[str] = set()


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MixtureRates:
  shakespeare: float = 0.5
  passkey: float = 0.3
  mqar: float = 0.2
  copy: float = 0.0

  def __post_init__(self):
    check_types(self)  # a wrong-typed gin binding fails here, naming it


class _SelfShuffledSource(seqio.FunctionDataSource):
  """A FunctionDataSource whose dataset_fn shuffles, so seqio adds no buffer."""

  @property
  def performs_internal_shuffling(self) -> bool:
    return True


def index_stream(n: int, shuffle: bool, seed) -> tf.data.Dataset:
  """Indices into n examples: range(n) once, or a fresh permutation per epoch forever.

  The permutation depends only on (seed, epoch), so every host computes the
  same one and seqio's per-host `shard` of it is disjoint.
  """
  if not shuffle:
    return tf.data.Dataset.range(n)
  seed = 0 if seed is None else seed

  def permuted(i):
    epoch = i // n
    return tf.random.experimental.index_shuffle(
        i % n, seed=tf.stack([tf.constant(seed, tf.int64), epoch]), max_index=n - 1
    )

  return tf.data.Dataset.counter().map(permuted)


def gather_source(columns_fn) -> seqio.DataSource:
  """Source yielding {"segments", "loss"} rows of columns_fn(split) by index."""

  def dataset_fn(split, shuffle_files, seed=None):
    segments, loss = columns_fn(split)
    segments = tf.constant(segments.tolist(), tf.string)
    loss = tf.constant(loss, tf.int32)
    return index_stream(len(loss), shuffle_files, seed).map(
        lambda i: {"segments": tf.gather(segments, i), "loss": tf.gather(loss, i)}
    )

  return _SelfShuffledSource(dataset_fn, splits=SPLITS)


def cut_windows(documents, sequence_length: int):
  """Documents' token ids, each already ending in EOS, as windows into one token array.

  Returns (tokens [N] int32: the documents back to back,
           bounds [W, 2] int64: [start, end) of each window). Windows never cross documents
  and tile each one (no token dropped); each holds sequence_length tokens except a document's
  last one.
  """
  pieces, bounds, offset = [], [], 0
  for ids in documents:
    starts = np.arange(0, len(ids), sequence_length)
    ends = np.minimum(starts + sequence_length, len(ids))
    bounds.append(np.stack([starts, ends], 1) + offset)
    pieces.append(np.asarray(ids, np.int32))
    offset += len(ids)
  if not pieces:
    return np.zeros([0], np.int32), np.zeros([0, 2], np.int64)
  return np.concatenate(pieces), np.concatenate(bounds).astype(np.int64)


def windows_dataset(tokens: np.ndarray, bounds: np.ndarray, shuffle: bool,
                    seed) -> tf.data.Dataset:
  """{"targets", "loss_mask"} windows of cut_windows' arrays, by index (see index_stream):
  loss everywhere. The iterator state is index_stream's counter."""
  tokens, bounds_t = tf.constant(tokens), tf.constant(bounds)

  def window(i):
    ids = tokens[bounds_t[i, 0] : bounds_t[i, 1]]
    return {"targets": ids, "loss_mask": tf.ones_like(ids)}

  return index_stream(len(bounds), shuffle, seed).map(window)


@functools.cache
def shakespeare_windows(vocabulary_name: str, sequence_length: int, split: str):
  """A split's plays tokenized up front (each + EOS), as cut_windows' (tokens, bounds)."""
  vocab_ = vocab.from_name(vocabulary_name)
  return cut_windows((vocab_.encode(text) + [vocab_.eos_id]
                      for text in shakespeare.split_texts(split)), sequence_length)


def shakespeare_source(cfg) -> seqio.DataSource:
  """Source of already-tokenized windows {"targets", "loss_mask"}, loss everywhere.

  Windowing needs token counts, so the plays are tokenized here (with the
  task's seqio vocabulary) rather than in a preprocessor; this also lets us
  shuffle windows globally by index instead of through a shuffle buffer.
  """

  def dataset_fn(split, shuffle_files, seed=None):
    tokens, bounds = shakespeare_windows(cfg.vocabulary, cfg.sequence_length, split)
    return windows_dataset(tokens, bounds, shuffle_files, seed)

  return _SelfShuffledSource(dataset_fn, splits=SPLITS)


@functools.cache
def passkey_columns(config: passkey.PasskeyConfig, sequence_length: int, split: str):
  return passkey.generate(config, split, sequence_length)


@functools.cache
def mqar_columns(config: mqar.MqarConfig, split: str):
  return mqar.generate(config, split)


@functools.cache
def copy_columns(config: copying.CopyConfig, split: str):
  return copying.generate(config, split)


@functools.cache
def phonebook_columns(config: phonebook.PhonebookConfig, split: str):
  return phonebook.generate(config, split)


def output_features(cfg) -> dict[str, seqio.Feature]:
  return {
      # EOS is appended by us (at a document's end, not a window's end).
      "targets": seqio.Feature(vocab.vocabulary(cfg), add_eos=False),
      "loss_mask": seqio.Feature(seqio.PassThroughVocabulary(size=2), add_eos=False),
  }


def check_passkey_fits(cfg, passkey_cfg) -> None:
  """Config errors visible before generating (exact for byte tokens)."""
  passkey.resolve_prompt_bytes(passkey_cfg, cfg.sequence_length)
  if cfg.vocabulary == "byte" and passkey_cfg.prompt_bytes is not None and (
      passkey_cfg.prompt_bytes + passkey_cfg.digits + 1 > cfg.sequence_length
  ):
    raise ConfigError(
        f"PasskeyConfig.prompt_bytes={passkey_cfg.prompt_bytes} plus answer "
        f"and EOS exceeds DataConfig.sequence_length={cfg.sequence_length}. "
        "Fix: lower prompt_bytes or leave it None to fit automatically."
    )


def check_example_fits(cfg, what: str, example_bytes: int, fix: str) -> None:
  """A synthetic example of `example_bytes` (its EOS added) must fit a byte-token row."""
  need = example_bytes + 1
  if cfg.vocabulary == "byte" and need > cfg.sequence_length:
    raise ConfigError(
        f"{what} takes up to {need} byte tokens, more than "
        f"DataConfig.sequence_length={cfg.sequence_length}. Fix: raise sequence_length or "
        f"{fix}."
    )


def register_task(name: str, source: seqio.DataSource, preprocessors: list, output_features,
                  *, answers: bool) -> None:
  """(Re)registers a seqio Task and declares its kind: `answers` = prompt -> answer (the loss
  weights mark the answer; eval reports exact match), else plain LM.

  The source shuffles itself (lcjax's shuffle by index, see index_stream): seqio adds no
  shuffle buffer.
  """
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, source=source, preprocessors=preprocessors,
                         output_features=output_features, shuffle_buffer_size=None)
  if answers:
    _ANSWER_TASKS.add(name)
  else:
    _ANSWER_TASKS.discard(name)


def has_answers(name: str) -> bool:
  """Whether task `name` was registered as prompt -> answer (False for unknown tasks)."""
  return name in _ANSWER_TASKS


def register_tasks(cfg) -> None:
  """(Re)registers all lcjax tasks and the mixture for DataConfig `cfg`.

  Idempotent: replaces earlier registrations, so the current gin bindings
  (PasskeyConfig, MqarConfig, MixtureRates) and `cfg` take effect.
  """
  passkey_cfg, mqar_cfg, rates = passkey.PasskeyConfig(), mqar.MqarConfig(), MixtureRates()
  copy_cfg, phonebook_cfg = copying.CopyConfig(), phonebook.PhonebookConfig()

  # Checked when a task's data is first built, so a config that never uses
  # a task is not rejected because of it.
  def passkey_split(split):
    check_passkey_fits(cfg, passkey_cfg)
    return passkey_columns(passkey_cfg, cfg.sequence_length, split)

  def mqar_split(split):
    check_example_fits(cfg, "An MQAR example", mqar.example_bytes(mqar_cfg),
                       "lower MqarConfig.num_pairs / num_queries")
    return mqar_columns(mqar_cfg, split)

  def copy_split(split):
    check_example_fits(cfg, "A copy example", copying.example_bytes(copy_cfg),
                       "lower CopyConfig.max_chars")
    return copy_columns(copy_cfg, split)

  def phonebook_split(split):
    check_example_fits(cfg, "A phonebook example", phonebook.example_bytes(phonebook_cfg),
                       "lower PhonebookConfig.max_entries")
    return phonebook_columns(phonebook_cfg, split)

  def tokenize(eos_loss):
    return [
        functools.partial(preprocessors.tokenize_segments, eos_loss=eos_loss),
        preprocessors.check_fits,
    ]

  features = output_features(cfg)
  seqio.MixtureRegistry.remove(DEMO)
  # The source tokenizes: no preprocessors.
  register_task(SHAKESPEARE, shakespeare_source(cfg), [], features, answers=False)
  register_task(PASSKEY, gather_source(passkey_split), tokenize(eos_loss=True), features,
                answers=True)
  register_task(MQAR, gather_source(mqar_split), tokenize(eos_loss=False), features,
                answers=True)
  register_task(COPY, gather_source(copy_split), tokenize(eos_loss=True), features,
                answers=True)
  register_task(PHONEBOOK, gather_source(phonebook_split), tokenize(eos_loss=True), features,
                answers=True)
  # Copy joins only when it has a rate: seqio builds every task of a mixture, and a copy example
  # (up to ~100 bytes by default) must not make rows of 64 tokens an error for runs without it.
  members = [(SHAKESPEARE, rates.shakespeare), (PASSKEY, rates.passkey), (MQAR, rates.mqar)]
  seqio.MixtureRegistry.add(DEMO, members + [(COPY, rates.copy)] * (rates.copy > 0))
