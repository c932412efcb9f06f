"""Pseudo-words: pronounceable, deterministic from a seed, nothing downloaded (the phonebook's
surnames, RULER-style probes' words)."""
import numpy as np

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def pseudo_words(rng: np.random.Generator, n: int, syllables: int = 3) -> list[str]:
  """`n` distinct pronounceable pseudo-words (consonant-vowel syllables), no word list needed."""
  cv = np.array([c + v for c in _CONSONANTS for v in _VOWELS])
  words: dict[str, None] = {}
  while len(words) < n:
    # Draw in batches (a long context needs tens of thousands); repeats are dropped.
    draws = cv[rng.integers(0, len(cv), size=(n - len(words), syllables))]
    words.update(dict.fromkeys("".join(row) for row in draws.tolist()))
  return list(words)[:n]
