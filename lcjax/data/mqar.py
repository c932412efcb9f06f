"""Multi-query associative recall (MQAR, as in the zoology benchmark), in text.

An example lists key-value pairs, then queries some of the keys again, each
followed by its value:
  "abc:17 qrs:03 xyz:92 | xyz:92 abc:17"
Loss is only on the value digits in the query section (not on EOS).
Keys are 3 lowercase letters (unique within an example); values are 2 digits.
"""
import dataclasses
import itertools
import string

import gin
import numpy as np

from lcjax.config import check_types
from lcjax.errors import ConfigError

# One "key:value" pair of a decoded prompt.
PAIR_RE = r"([a-z]{3}):(\d{2})"
SEPARATOR = " | "
# Key code c -> its 3-letter text.
KEY_TEXT = ["".join(k) for k in itertools.product(string.ascii_lowercase, repeat=3)]
VALUE_TEXT = [f"{v:02d}" for v in range(100)]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MqarConfig:
  num_pairs: int = 32
  num_queries: int = 16
  num_train: int = 20000
  num_validation: int = 256
  train_seed: int = 3
  validation_seed: int = 4

  def __post_init__(self):
    check_types(self)  # a wrong-typed gin binding fails here, naming it


def example_bytes(cfg: MqarConfig) -> int:
  """Byte length of one example (without EOS): fixed by the format."""
  return 7 * cfg.num_pairs - 1 + len(SEPARATOR) + 7 * cfg.num_queries - 1


def unique_keys(rng: np.random.Generator, n: int, num_pairs: int) -> np.ndarray:
  """[n, num_pairs] distinct-per-row key codes in [0, 26**3)."""
  codes = rng.integers(0, 26**3, size=(n, num_pairs))
  # Redraw the few rows with a repeated key (cheaper than n draws without replacement).
  while True:
    sorted_codes = np.sort(codes, axis=1)
    bad = np.nonzero((sorted_codes[:, 1:] == sorted_codes[:, :-1]).any(axis=1))[0]
    if not len(bad):
      return codes
    codes[bad] = rng.integers(0, 26**3, size=(len(bad), num_pairs))


def make_segments(keys, values, queries) -> list[tuple[str, int]]:
  """One example as (text, loss flag) segments; values in queries have loss."""
  context = " ".join(f"{k}:{v}" for k, v in zip(keys, values))
  segments, text = [], context + SEPARATOR
  for i, q in enumerate(queries):
    text += ("" if i == 0 else " ") + keys[q] + ":"
    segments += [(text, 0), (values[q], 1)]
    text = ""
  return segments


def generate(cfg: MqarConfig, split: str):
  """Generates a split deterministically from its seed.

  Returns (segments [n, 2 * num_queries] str, loss [n, 2 * num_queries] int32).
  """
  if not 0 < cfg.num_queries <= cfg.num_pairs <= len(KEY_TEXT) // 2:
    raise ConfigError(
        f"MqarConfig needs 1 <= num_queries ({cfg.num_queries}) <= num_pairs "
        f"({cfg.num_pairs}) <= {len(KEY_TEXT) // 2}. Fix: adjust them."
    )
  n, seed = (
      (cfg.num_train, cfg.train_seed)
      if split == "train"
      else (cfg.num_validation, cfg.validation_seed)
  )
  rng = np.random.default_rng(seed)
  codes = unique_keys(rng, n, cfg.num_pairs)
  values = rng.integers(0, 100, size=(n, cfg.num_pairs))
  # Queries: the first num_queries of a random permutation of the pairs.
  queries = np.argsort(rng.random((n, cfg.num_pairs)), axis=1)[:, : cfg.num_queries]
  examples = [
      make_segments([KEY_TEXT[c] for c in row_codes], [VALUE_TEXT[v] for v in row_values],
                    row_queries)
      for row_codes, row_values, row_queries in zip(
          codes.tolist(), values.tolist(), queries.tolist())
  ]
  segments = np.array([[t for t, _ in ex] for ex in examples], dtype=object)
  loss = np.array([[w for _, w in ex] for ex in examples], dtype=np.int32)
  return segments, loss
