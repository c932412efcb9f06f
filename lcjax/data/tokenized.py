"""Pre-tokenized corpora: token ids on disk, so that the input pipeline does no tokenization.

A corpus directory (written by `python -m lcjax.data.pretokenize`) holds, per file,
  PREFIX.tokens.npy   int32 [N]      every document's ids back to back (no EOS)
  PREFIX.offsets.npy  int64 [D + 1]  document d is tokens[offsets[d]:offsets[d + 1]]
and one vocabulary.json ({"vocabulary", "vocab_size", "eos_id"}) naming the vocabulary the ids
belong to; reading checks it against DataConfig.vocabulary. Files go through tf.io.gfile (local
or gs://); local ones are memory-mapped, so a process reading documents by index touches only
its own.
"""
import dataclasses
import json
import os

import gin
import numpy as np
import tensorflow as tf

from lcjax.data import sources, vocab
from lcjax.errors import DataError

TOKENS, OFFSETS, VOCABULARY = ".tokens.npy", ".offsets.npy", "vocabulary.json"


def _load(path: str) -> np.ndarray:
  if "://" not in path:
    return np.load(path, mmap_mode="r")
  with tf.io.gfile.GFile(path, "rb") as f:
    return np.load(f)


def _save(path: str, array: np.ndarray) -> None:
  with tf.io.gfile.GFile(path, "wb") as f:
    np.save(f, array)


def vocabulary_record(vocabulary_name: str, vocab_) -> dict:
  return {"vocabulary": vocabulary_name, "vocab_size": vocab_.vocab_size,
          "eos_id": vocab_.eos_id}


def check_vocabulary(directory: str, vocabulary_name: str, vocab_) -> None:
  """DataError unless `directory` was tokenized with a vocabulary of vocab_'s size and EOS."""
  path = f"{directory}/{VOCABULARY}"
  if not tf.io.gfile.exists(path):
    raise DataError(f"{path} is missing, so the ids in {directory} belong to an unknown "
                    "vocabulary. Fix: write the corpus with `python -m lcjax.data.pretokenize`.")
  with tf.io.gfile.GFile(path) as f:
    record = json.load(f)
  want = vocabulary_record(vocabulary_name, vocab_)
  if (record.get("vocab_size"), record.get("eos_id")) != (want["vocab_size"], want["eos_id"]):
    raise DataError(f"{directory} was tokenized with {record.get('vocabulary')!r} "
                    f"({record.get('vocab_size')} ids, EOS {record.get('eos_id')}), not "
                    f"DataConfig.vocabulary={vocabulary_name!r} ({want['vocab_size']} ids, EOS "
                    f"{want['eos_id']}). Fix: set DataConfig.vocabulary to the corpus's, or "
                    "pre-tokenize it again.")


def read_documents(path: str):
  """Yields the id arrays (int32, no EOS) of one PREFIX.tokens.npy file's documents."""
  if not path.endswith(TOKENS):
    raise DataError(f"{path} is not a {TOKENS} file. Fix: TokenSource.files globs the "
                    f"*{TOKENS} files that `python -m lcjax.data.pretokenize` writes.")
  if tf.io.gfile.stat(path).length == 0:
    raise DataError(f"{path} is empty. Fix: remove it or pre-tokenize again.")
  offsets_path = path[: -len(TOKENS)] + OFFSETS
  if not tf.io.gfile.exists(offsets_path):
    raise DataError(f"{offsets_path} is missing: {path} has no document index. Fix: copy it "
                    "with the tokens, or pre-tokenize again.")
  tokens, offsets = _load(path), _load(offsets_path)
  if len(offsets) < 2:
    raise DataError(f"{offsets_path} has no documents. Fix: remove {path} and it.")
  if offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 0):
    raise DataError(f"{offsets_path} does not index {path} ({len(tokens)} tokens): the pair is "
                    "damaged or mismatched. Fix: pre-tokenize again.")
  for start, end in zip(offsets[:-1], offsets[1:]):
    yield np.asarray(tokens[start:end], np.int32)


@gin.configurable
@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenSource(sources.FilesSource):
  """A pre-tokenized corpus (module doc): files / validation_files glob its *.tokens.npy files;
  shared out between processes and windowed as every file source (sources.py).
  on_decode_error does not apply (nothing is decoded)."""

  def token_ids(self, vocabulary_name, split, shard_index, num_shards):
    vocab_ = vocab.from_name(vocabulary_name)
    for directory in sorted({os.path.dirname(p) for p in self.shards(split)}):
      check_vocabulary(directory, vocabulary_name, vocab_)
    return sources.shard_documents(self, split, shard_index, num_shards)

  def documents(self, path, skipped):
    del skipped  # ids are not decoded
    return read_documents(path)


def write(source: sources.Source, vocabulary_name: str, split: str, output: str,
          num_files: int) -> list[str]:
  """Tokenizes a split of `source` (all of it, unfiltered: the reading source filters) into
  num_files files under `output`, document d in file d mod num_files; returns their paths."""
  docs = [[] for _ in range(num_files)]
  for d, ids in enumerate(source.token_ids(vocabulary_name, split, 0, 1)):
    docs[d % num_files].append(np.asarray(ids, np.int32))
  tf.io.gfile.makedirs(output)
  paths = []
  for k, part in enumerate(docs):
    if not part:
      continue
    prefix = f"{output}/{split}-{k:05d}-of-{num_files:05d}"
    _save(prefix + TOKENS, np.concatenate(part))
    _save(prefix + OFFSETS, np.cumsum([0] + [len(p) for p in part]).astype(np.int64))
    paths.append(prefix + TOKENS)
  with tf.io.gfile.GFile(f"{output}/{VOCABULARY}", "w") as f:
    json.dump(vocabulary_record(vocabulary_name, vocab.from_name(vocabulary_name)), f)
  return paths
