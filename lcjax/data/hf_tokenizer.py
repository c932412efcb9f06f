"""A Hugging Face tokenizer.json (through the `tokenizers` package) as a seqio vocabulary, so
that a model imported from Hugging Face trains on text tokenized exactly as upstream.

Ids are the tokenizer's own: `encode(text)` equals `Tokenizer.encode(text,
add_special_tokens=False).ids` (no BOS or EOS from the tokenizer's post-processor; padding and
truncation saved in the file are turned off, so a long document is never cut here).

BOS and EOS in lcjax's pipeline:
- EOS (seqio's `eos_id`) is the id of the tokenizer's end-of-text token: `HfTokenizerConfig.
  eos_token` when set, else the `eos_token` of a tokenizer_config.json next to the file, else
  the first of KNOWN_EOS that the tokenizer has. The sources append it at each document's end
  (never at a window's end), as with lcjax's own vocabularies.
- No BOS is added: like every lcjax batch, each document's first input is id 0 (the feature
  converter's shift), which here is whatever token the tokenizer numbers 0. Padding is id 0
  too, told apart by segment_ids 0 and weighing nothing in the loss.
- DataConfig.anchor is refused with this vocabulary unless its EOS is id 1 (the anchor's
  target, pipeline.py).
"""
import dataclasses
import functools
import json
import os

import gin
import numpy as np
import seqio
import tensorflow as tf
import tokenizers

from lcjax.config import check_types
from lcjax.errors import ConfigError

KNOWN_EOS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class HfTokenizerConfig:
  eos_token: str = ""  # "" = from tokenizer_config.json next to the file, else KNOWN_EOS

  def __post_init__(self):
    check_types(self)  # a wrong-typed gin binding fails here, naming it


def _configured_eos(path: str) -> str:
  """The EOS token named by tokenizer_config.json next to `path` ("" if none)."""
  config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
  if not tf.io.gfile.exists(config):
    return ""
  with tf.io.gfile.GFile(config) as f:
    eos = json.load(f).get("eos_token") or ""
  return eos.get("content", "") if isinstance(eos, dict) else eos


class HfTokenizerVocabulary(seqio.Vocabulary):
  """seqio vocabulary over a tokenizer.json (module doc: ids, BOS and EOS).

  vocab_size counts the added tokens too (what a model's embedding must cover).
  """

  def __init__(self, path: str, eos_token: str = ""):
    with tf.io.gfile.GFile(path) as f:
      self._tokenizer = tokenizers.Tokenizer.from_str(f.read())
    self._tokenizer.no_truncation()
    self._tokenizer.no_padding()
    self._path = path
    names = [eos_token] if eos_token else [t for t in [_configured_eos(path), *KNOWN_EOS] if t]
    self._eos = next((self._tokenizer.token_to_id(t) for t in names
                      if self._tokenizer.token_to_id(t) is not None), None)
    if self._eos is None:
      raise ConfigError(f"The tokenizer {path} has none of the end-of-text tokens {names}. "
                        "Fix: bind HfTokenizerConfig.eos_token to its end-of-text token.")
    super().__init__(extra_ids=0)

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def unk_id(self) -> int | None:
    unk = getattr(self._tokenizer.model, "unk_token", None)
    return self._tokenizer.token_to_id(unk) if unk else None

  @property
  def _base_vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def _encode(self, s: str) -> list[int]:
    return self._tokenizer.encode(s, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """[encode(t) for t in texts], on the tokenizer's own threads."""
    return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

  def _decode(self, ids) -> str:
    # Special tokens (EOS included) decode to nothing, as in SentencePiece vocabularies.
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """A scalar string -> int32 [n] (a host callback: the tokenizer is not a TF op)."""
    ids = tf.numpy_function(
        lambda b: np.array(self._encode(np.asarray(b).item().decode("utf-8")), np.int32),
        [s], tf.int32, stateful=False)
    return tf.ensure_shape(ids, [None])

  def decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """int [..., n] -> string [...], each row through its first EOS as `decode` (a host
    callback; seqio's own would write pad id 0, a real token here, after the EOS)."""
    def decode_rows(a):
      rows = a.reshape(-1, a.shape[-1])
      return np.array([self.decode(r.tolist()).encode("utf-8") for r in rows],
                      object).reshape(a.shape[:-1])

    out = tf.numpy_function(decode_rows, [ids], tf.string, stateful=False)
    return tf.ensure_shape(out, ids.shape[:-1])

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    return self.decode_tf(ids)

  def __eq__(self, other) -> bool:
    return (isinstance(other, HfTokenizerVocabulary) and self._path == other._path
            and self._eos == other._eos)

  def __hash__(self) -> int:
    return hash((self._path, self._eos))


@functools.cache
def _load(path: str, eos_token: str) -> HfTokenizerVocabulary:
  return HfTokenizerVocabulary(path, eos_token)


def load(path: str) -> HfTokenizerVocabulary:
  """The vocabulary of a tokenizer.json, with the EOS that HfTokenizerConfig's gin bindings
  name now (loaded once per path and EOS)."""
  return _load(path, HfTokenizerConfig().eos_token)
