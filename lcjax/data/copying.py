"""Copying a random string (Jelassi et al. 2024, "Repeat After Me"): the string, a separator,
the string again.

  prompt = "q7d0kzr2 = "      answer = "q7d0kzr2"

Loss is on the copy and on the EOS after it. Every copied character is a retrieval: find where
the characters just written occurred in the string and read the one after them (an induction
head). Passkey retrieval needs the same lookup once per prompt; here each example asks it at
every position, so a small model sees far more of it per training token.
"""
import dataclasses
import string

import gin
import numpy as np

from lcjax.config import check_types
from lcjax.data.splits import split_draws
from lcjax.errors import ConfigError

SEPARATOR = " = "
ALPHABET = string.ascii_lowercase + string.digits


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CopyConfig:
  """min_chars / max_chars: each string's length is uniform in [min_chars, max_chars];
  characters are drawn uniformly from ALPHABET."""
  min_chars: int = 8
  max_chars: int = 48
  num_train: int = 20000
  num_validation: int = 256
  train_seed: int = 5
  validation_seed: int = 6

  def __post_init__(self):
    check_types(self)  # a wrong-typed gin binding fails here, naming it
    if not 1 <= self.min_chars <= self.max_chars:
      raise ConfigError(f"CopyConfig needs 1 <= min_chars ({self.min_chars}) <= max_chars "
                        f"({self.max_chars}). Fix: adjust them.")


def example_bytes(cfg: CopyConfig) -> int:
  """Byte length of the longest example (without EOS)."""
  return 2 * cfg.max_chars + len(SEPARATOR)


def generate(cfg: CopyConfig, split: str):
  """Generates a split deterministically from its seed.

  Returns (segments [n, 2] str: prompt, answer; loss [n, 2] int32: on the answer).
  """
  n, rng = split_draws(cfg, split)
  lengths = rng.integers(cfg.min_chars, cfg.max_chars + 1, size=n)
  letters = np.array(list(ALPHABET))
  texts = ["".join(letters[rng.integers(0, len(ALPHABET), size=k)]) for k in lengths]
  segments = np.array([[t + SEPARATOR, t] for t in texts], dtype=object)
  return segments, np.tile(np.array([[0, 1]], np.int32), (n, 1))
