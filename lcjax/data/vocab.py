"""Vocabulary choice: byte-level by default, or a SentencePiece model file."""
import os

import seqio

from lcjax.errors import ConfigError


def vocabulary(cfg) -> seqio.Vocabulary:
  """Returns the vocabulary of a DataConfig."""
  return from_name(cfg.vocabulary)


def from_name(name: str) -> seqio.Vocabulary:
  """"byte" or a SentencePiece .model path -> vocabulary.

  Both reserve pad=0, eos=1, unk=2 (train_spm.py trains models that way).
  """
  if name == "byte":
    return seqio.ByteVocabulary()
  if not os.path.exists(name):
    raise ConfigError(
        f"DataConfig.vocabulary={name!r} is neither 'byte' nor an existing "
        "SentencePiece model file. Fix: set it to 'byte', or train one with "
        "`python -m lcjax.data.train_spm --vocab_size=N --output=PREFIX` and "
        "set it to PREFIX.model."
    )
  return seqio.SentencePieceVocabulary(name)
