"""Multi-query associative recall (MQAR, as in the zoology benchmark), in text.

An example lists key-value pairs, then queries some of the keys again, each
followed by its value:
  "abc:17 qrs:03 xyz:92 | xyz:92 abc:17"
Loss is only on the value digits in the query section (not on EOS).
Keys are `key_letters` lowercase letters (unique within an example); values are
`value_digits` digits. One letter and one digit make every key and value a single
byte token, as zoology's MQAR has them: recall without first having to assemble a
key from several tokens, which small models learn in far fewer steps.

`filler` random capital letters between the pairs and the queries make the example longer
without adding pairs ("a:7 q:3XKQBTR | q:3 a:7"): the same recall over a longer distance,
through tokens that are neither keys nor values.
"""
import dataclasses
import itertools
import string

import gin
import numpy as np

from lcjax.config import check_types
from lcjax.data.splits import split_draws
from lcjax.errors import ConfigError

SEPARATOR = " | "


def pair_re(key_letters: int = 3, value_digits: int = 2) -> str:
  """Matches one "key:value" pair of a decoded prompt."""
  return rf"([a-z]{{{key_letters}}}):(\d{{{value_digits}}})"


def key_texts(key_letters: int = 3) -> list[str]:
  """Key code c -> its text."""
  return ["".join(k) for k in itertools.product(string.ascii_lowercase, repeat=key_letters)]


def value_texts(value_digits: int = 2) -> list[str]:
  return [f"{v:0{value_digits}d}" for v in range(10**value_digits)]


# The default format's pairs, keys and values (the suite's MQAR probe uses it).
PAIR_RE, KEY_TEXT, VALUE_TEXT = pair_re(), key_texts(), value_texts()


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MqarConfig:
  num_pairs: int = 32
  num_queries: int = 16
  num_train: int = 20000
  num_validation: int = 256
  train_seed: int = 3
  validation_seed: int = 4
  key_letters: int = 3
  value_digits: int = 2
  filler: int = 0

  def __post_init__(self):
    check_types(self)  # a wrong-typed gin binding fails here, naming it


def example_bytes(cfg: MqarConfig) -> int:
  """Byte length of one example (without EOS): fixed by the format."""
  pair = cfg.key_letters + 1 + cfg.value_digits + 1  # "abc:17 "
  return pair * cfg.num_pairs - 1 + cfg.filler + len(SEPARATOR) + pair * cfg.num_queries - 1


def unique_keys(rng: np.random.Generator, n: int, num_pairs: int,
                num_keys: int = 26**3) -> np.ndarray:
  """[n, num_pairs] distinct-per-row key codes in [0, num_keys)."""
  codes = rng.integers(0, num_keys, size=(n, num_pairs))
  # Redraw the few rows with a repeated key (cheaper than n draws without replacement).
  while True:
    sorted_codes = np.sort(codes, axis=1)
    bad = np.nonzero((sorted_codes[:, 1:] == sorted_codes[:, :-1]).any(axis=1))[0]
    if not len(bad):
      return codes
    codes[bad] = rng.integers(0, num_keys, size=(len(bad), num_pairs))


def make_segments(keys, values, queries, filler: str = "") -> list[tuple[str, int]]:
  """One example as (text, loss flag) segments; values in queries have loss."""
  context = " ".join(f"{k}:{v}" for k, v in zip(keys, values))
  segments, text = [], context + filler + SEPARATOR
  for i, q in enumerate(queries):
    text += ("" if i == 0 else " ") + keys[q] + ":"
    segments += [(text, 0), (values[q], 1)]
    text = ""
  return segments


def generate(cfg: MqarConfig, split: str):
  """Generates a split deterministically from its seed.

  Returns (segments [n, 2 * num_queries] str, loss [n, 2 * num_queries] int32).
  """
  if not (1 <= cfg.key_letters <= 3 and 1 <= cfg.value_digits <= 2):
    raise ConfigError(
        f"MqarConfig.key_letters={cfg.key_letters} / value_digits={cfg.value_digits}: "
        "keys take 1-3 letters and values 1-2 digits. Fix: bind values in those ranges."
    )
  if cfg.filler < 0:
    raise ConfigError(f"MqarConfig.filler={cfg.filler} is negative. Fix: bind 0 or more bytes.")
  keys, value_text = key_texts(cfg.key_letters), value_texts(cfg.value_digits)
  if not 0 < cfg.num_queries <= cfg.num_pairs <= len(keys) // 2:
    raise ConfigError(
        f"MqarConfig needs 1 <= num_queries ({cfg.num_queries}) <= num_pairs "
        f"({cfg.num_pairs}) <= {len(keys) // 2} (half the {cfg.key_letters}-letter keys). "
        "Fix: adjust them, or raise MqarConfig.key_letters."
    )
  n, rng = split_draws(cfg, split)
  codes = unique_keys(rng, n, cfg.num_pairs, len(keys))
  values = rng.integers(0, len(value_text), size=(n, cfg.num_pairs))
  # Queries: the first num_queries of a random permutation of the pairs.
  queries = np.argsort(rng.random((n, cfg.num_pairs)), axis=1)[:, : cfg.num_queries]
  # Drawn after everything else, so that filler = 0 leaves the examples as they were.
  fillers = rng.integers(0, 26, size=(n, cfg.filler))
  examples = [
      make_segments([keys[c] for c in row_codes], [value_text[v] for v in row_values],
                    row_queries, "".join(string.ascii_uppercase[f] for f in row_filler))
      for row_codes, row_values, row_queries, row_filler in zip(
          codes.tolist(), values.tolist(), queries.tolist(), fillers.tolist())
  ]
  segments = np.array([[t for t, _ in ex] for ex in examples], dtype=object)
  loss = np.array([[w for _, w in ex] for ex in examples], dtype=np.int32)
  return segments, loss
