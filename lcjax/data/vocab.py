"""Vocabulary choice: byte-level by default, a SentencePiece model file, or a Hugging Face
tokenizer.json (hf_tokenizer.py)."""
import os

import seqio
import tensorflow as tf

from lcjax.data import hf_tokenizer
from lcjax.errors import ConfigError


def vocabulary(cfg) -> seqio.Vocabulary:
  """Returns the vocabulary of a DataConfig."""
  return from_name(cfg.vocabulary)


def from_name(name: str) -> seqio.Vocabulary:
  """"byte", a SentencePiece .model path or a tokenizer.json path (any name ending in .json,
  local or gs://) -> vocabulary.

  Byte and SentencePiece reserve pad=0, eos=1, unk=2 (train_spm.py trains models that way); a
  tokenizer.json keeps its own ids (hf_tokenizer.py says which EOS).
  """
  if name == "byte":
    return seqio.ByteVocabulary()
  if name.endswith(".json") and tf.io.gfile.exists(name):
    return hf_tokenizer.load(name)
  if not os.path.exists(name):
    raise ConfigError(
        f"DataConfig.vocabulary={name!r} is neither 'byte' nor an existing "
        "SentencePiece model file or Hugging Face tokenizer.json. Fix: set it to 'byte', "
        "a tokenizer.json, or train one with "
        "`python -m lcjax.data.train_spm --vocab_size=N --output=PREFIX` and "
        "set it to PREFIX.model."
    )
  return seqio.SentencePieceVocabulary(name)
