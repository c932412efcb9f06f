"""Corpora of one's own, from gin: plain text and JSONL files (and, in tokenized.py,
pre-tokenized ones) as seqio tasks.

Each source is a gin-configurable frozen dataclass named in `DataConfig.sources`; it becomes a
seqio Task of its `name` (usable as DataConfig.train_mixture, in eval_tasks with
validation_files, or in a seqio Mixture), plain LM with loss everywhere:

  books/TextSource.name = 'books'
  books/TextSource.files = ['gs://bucket/books/*.txt']
  DataConfig.sources = [@books/TextSource()]
  DataConfig.train_mixture = 'books'

A process reads only its share of the files (files[index::num_shards], when there are at least
as many files as processes; else every document whose index over all files is index mod
num_shards), tokenizes its documents (each + EOS), drops those outside [min_tokens,
max_tokens], and cuts the rest into windows of the row length exactly as Shakespeare's plays
(tasks.cut_windows: no truncation). Windows are read by index through tasks.index_stream, so
the iterator state stays one counter per process, exact on resume.
"""
import dataclasses
import functools
import logging

import gin
import numpy as np
import seqio

from lcjax.config import check_types
from lcjax.data import readers, tasks, vocab
from lcjax.errors import ConfigError, DataError

SPLIT_FIELDS = {"train": "files", "validation": "validation_files"}
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Source:
  """What every source has: the task `name`, and min_tokens / max_tokens, which keep documents
  of that many tokens (before EOS; None: no maximum), dropping the others whole (long
  documents are windowed, never truncated).

  A source yields this process's documents of a split as token ids (`token_ids`); file sources
  (FilesSource) read texts and tokenize them. A source of another kind overrides `token_ids`
  (pre-tokenized: ids as stored) or `texts` and `shards` (e.g. TFDS)."""
  name: str
  min_tokens: int = 0
  max_tokens: int | None = None

  def __post_init__(self):
    check_types(self)  # a wrong-typed gin binding fails here, naming it
    if not self.name:
      raise ConfigError(f"{type(self).__name__}.name is empty: it names the seqio task.")
    if self.min_tokens < 0 or (self.max_tokens is not None and self.max_tokens < max(
        self.min_tokens, 1)):
      raise ConfigError(f"{self.describe()}: min_tokens={self.min_tokens}, max_tokens="
                        f"{self.max_tokens} keep no document. Fix: 0 <= min_tokens <= "
                        "max_tokens (or None).")

  def describe(self) -> str:
    return f"{type(self).__name__} {self.name!r}"

  def shards(self, split: str) -> list[str]:
    """The units a split is shared out in between processes (seqio's list_shards)."""
    raise NotImplementedError

  def texts(self, split: str, shard_index: int, num_shards: int):
    """Yields the texts of this process's documents of a split."""
    raise NotImplementedError

  def token_ids(self, vocabulary_name: str, split: str, shard_index: int, num_shards: int):
    """Yields the token ids (no EOS; DataConfig.vocabulary's) of this process's documents of a
    split."""
    return _encode_chunks(vocab.from_name(vocabulary_name),
                          self.texts(split, shard_index, num_shards))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FilesSource(Source):
  """A source read from files. files / validation_files: globs (one string or several) of the
  train / validation split (local or gs://; a directory means every file under it).
  on_decode_error: "raise" (the default) on bytes that are not UTF-8, or "skip" such documents
  (JSONL: such lines) with one counted warning per split and process."""
  files: str | tuple[str, ...]
  validation_files: str | tuple[str, ...] = ()
  on_decode_error: str = "raise"

  def __post_init__(self):
    super().__post_init__()
    for field in SPLIT_FIELDS.values():  # gin gives lists; one glob may be a plain string
      value = getattr(self, field)
      object.__setattr__(self, field, (value,) if isinstance(value, str) else tuple(value))
    if not self.files:
      raise ConfigError(f"{self.describe()}.files is empty. Fix: give the training files' "
                        "glob(s).")
    if self.on_decode_error not in readers.DECODE_ERRORS:
      raise ConfigError(f"{self.describe()}.on_decode_error={self.on_decode_error!r} is not "
                        f"one of {readers.DECODE_ERRORS}.")

  def shards(self, split):
    field = SPLIT_FIELDS[split]
    globs = getattr(self, field)
    if not globs:
      raise DataError(f"{self.describe()} has no {field}, so no {split} split. Fix: set "
                      f"{type(self).__name__}.{field}, or leave {self.name!r} out of "
                      "DataConfig.eval_tasks.")
    return readers.expand(globs, f"{self.describe()}.{field}")

  def texts(self, split, shard_index, num_shards):
    return shard_documents(self, split, shard_index, num_shards)

  def documents(self, path: str, skipped: readers.Skipped):
    """Yields the texts of the documents in one file."""
    raise NotImplementedError


@gin.configurable
@dataclasses.dataclass(frozen=True, kw_only=True)
class TextSource(FilesSource):
  """Plain UTF-8 text files: one document per file (delimiter ""), or documents separated by
  `delimiter` (e.g. "\\n\\n\\n" or "<|endoftext|>"; empty pieces dropped)."""
  delimiter: str = ""

  def documents(self, path, skipped):
    return readers.text_documents(path, self.delimiter, self.on_decode_error, skipped)


@gin.configurable
@dataclasses.dataclass(frozen=True, kw_only=True)
class JsonlSource(FilesSource):
  """JSON Lines files (gzip when the name ends in .gz), one document per line: the string
  `text_field`. filters: "field op value" expressions that must all hold for a line to be
  kept (op one of == != >= <= > <, value a JSON literal, field dotted for nested objects; a
  line without the field is dropped), e.g. ('meta.source == "arxiv"', 'length >= 65536')."""
  text_field: str = "text"
  filters: tuple[str, ...] = ()

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "filters", tuple(self.filters))
    for expression in self.filters:  # malformed filters fail before any file is read
      readers.parse_filter(expression, f"{self.describe()}.filters")

  def documents(self, path, skipped):
    return readers.jsonl_documents(path, self.text_field, self.filters, self.on_decode_error,
                                   skipped)


def check_names(names: list[str], builtin: tuple[str, ...]) -> None:
  """ConfigError if two of the tasks and mixtures that DataConfig adds, or one of them and a
  built-in task, share a name."""
  for name in names:
    if names.count(name) > 1 or name in builtin:
      raise ConfigError(f"DataConfig.sources / mixtures: the name {name!r} is used twice "
                        f"(built-in tasks: {list(builtin)}). Fix: give each its own name.")


def shard_documents(source: FilesSource, split: str, shard_index: int, num_shards: int):
  """Yields this process's documents of a split (module doc); logs how many were skipped as
  undecodable once all are read."""
  files = source.shards(split)
  by_file = len(files) >= num_shards
  skipped = readers.Skipped()
  index = 0
  for path in files[shard_index::num_shards] if by_file else files:
    for text in source.documents(path, skipped):
      if by_file or index % num_shards == shard_index:
        yield text
      index += 1
  if skipped.count:
    _log.warning("%s (%s, process %d of %d): skipped %d documents with bytes that are not "
                 "UTF-8, the first at %s.", source.describe(), split, shard_index, num_shards,
                 skipped.count, skipped.first)


def _encode_chunks(vocab_, texts, chunk: int = 256):
  """Yields each text's ids, several texts at a time where the vocabulary can (encode_batch)."""
  batch = getattr(vocab_, "encode_batch", None)
  if batch is None:
    yield from map(vocab_.encode, texts)
    return
  pending = []
  for text in texts:
    pending.append(text)
    if len(pending) == chunk:
      yield from batch(pending)
      pending = []
  yield from batch(pending) if pending else ()


@functools.cache
def source_windows(source: Source, vocabulary_name: str, sequence_length: int, split: str,
                   shard_index: int, num_shards: int):
  """This process's documents of a split, tokenized (each + EOS), length-filtered and cut into
  windows: tasks.cut_windows' (tokens [N] int32, bounds [W, 2] int64)."""
  vocab_ = vocab.from_name(vocabulary_name)
  kept, read = [], 0
  for ids in source.token_ids(vocabulary_name, split, shard_index, num_shards):
    read += 1
    if len(ids) >= source.min_tokens and (source.max_tokens is None
                                          or len(ids) <= source.max_tokens):
      kept.append(np.array([*ids, vocab_.eos_id], np.int32))
  if not kept:
    raise DataError(f"{source.describe()} ({split}) has no documents for process "
                    f"{shard_index} of {num_shards}: {read} read, none with min_tokens="
                    f"{source.min_tokens} <= tokens <= max_tokens={source.max_tokens}. Fix the "
                    "files, the filters or the token bounds.")
  return tasks.cut_windows(kept, sequence_length)


class WindowedSource(seqio.DataSource):
  """The seqio DataSource of a Source: shards itself (by file or by document, module doc)
  and shuffles itself (by index), so seqio adds neither a shard of the examples nor a
  shuffle buffer."""

  def __init__(self, source: Source, vocabulary_name: str, sequence_length: int):
    super().__init__(splits=tasks.SPLITS, performs_internal_shuffling=True)
    self._source, self._vocabulary, self._length = source, vocabulary_name, sequence_length

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> list[str]:
    return self._source.shards(split)

  def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, *,
                  sequence_length=None, use_cached=False, num_epochs=1):
    del sequence_length, use_cached, num_epochs  # windows of the row length; the task repeats
    index, shards = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
    tokens, bounds = source_windows(self._source, self._vocabulary, self._length, split,
                                    index, shards)
    return tasks.windows_dataset(tokens, bounds, shuffle, seed)


def register_sources(cfg) -> None:
  """(Re)registers a seqio Task for each of DataConfig `cfg`'s sources (plain LM)."""
  features = tasks.output_features(cfg)
  for source in cfg.sources:
    windows = WindowedSource(source, cfg.vocabulary, cfg.sequence_length)
    tasks.register_task(source.name, windows, [], features, answers=False)
