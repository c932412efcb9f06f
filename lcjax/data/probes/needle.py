"""Needle-in-a-haystack probes: the passkey grid cell (length x depth) and RULER's NIAH
variants (single, multikey, multivalue, multiquery).

`niah` uses the training passkey task's template (passkey.KEY_LINE, passkey.QUESTION), so a
model trained on passkey is probed in the format it learned; only the haystack and the
needle's shape change.
"""
import numpy as np

from lcjax.data import passkey
from lcjax.data.probes.base import (
    ADJECTIVES,
    NOUNS,
    CellError,
    Example,
    assemble,
    cell_rng,
    haystack_units,
    target_ids,
)

NEEDLES = ("digits", "words", "uuid")
# The longest needle of each other kind, in characters: niah's default budget is this + 2 tokens
# (EOS, and a word-start piece a SentencePiece vocabulary may add).
NEEDLE_CHARS = {
    "words": max(map(len, ADJECTIVES)) + 1 + max(map(len, NOUNS)),
    "uuid": 36,
}
VARIANTS = ("single", "multikey", "multivalue", "multiquery")


def default_max_new_tokens(needle: str, digits: int = 5) -> int:
  """niah's default generation budget: the needle's longest length in characters + 2."""
  return (digits if needle == "digits" else NEEDLE_CHARS[needle]) + 2

# RULER-style template (adapted): needles "One of the special magic numbers for KEY is: VALUE."
RULER_PREFIX = (
    "Some special magic numbers are hidden in the text below. Memorize them: "
    "you will be asked about them afterwards.\n"
)
RULER_NEEDLE = "One of the special magic numbers for {key} is: {value}. "
RULER_QUESTION = (
    "\nWhat are all the special magic numbers for {keys} mentioned in the text above? "
    "The special magic numbers for {keys} mentioned in the text above are"
)
# Matches one needle of a decoded RULER NIAH prompt: group 1 the key, group 2 the value.
RULER_NEEDLE_RE = r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d+)\."


def make_needle(rng: np.random.Generator, kind: str, digits: int = 5) -> str:
  """A random needle: "digits" `digits` digits (5, the passkey task's default, so a model
  trained on passkey is asked for keys of the length it learned), "words" adjective-noun,
  "uuid" 8-4-4-4-12 hex."""
  if kind == "digits":
    return "".join(map(str, rng.integers(0, 10, size=digits)))
  if kind == "words":
    return f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}"
  if kind == "uuid":
    hex_digits = "".join("0123456789abcdef"[i] for i in rng.integers(0, 16, size=32))
    cuts = np.cumsum([0, 8, 4, 4, 4, 12])
    return "-".join(hex_digits[a:b] for a, b in zip(cuts[:-1], cuts[1:]))
  raise CellError(f"Unknown needle {kind!r}; use one of {NEEDLES}.")


def niah(
    vocab,
    *,
    length: int,
    depth: float,
    num: int,
    seed: int,
    haystack: str = "filler",
    needle: str = "digits",
    digits: int = 5,
    max_new_tokens: int | None = None,
) -> list[Example]:
  """Passkey retrieval at one (length, depth) cell.

  prompt = haystack[:depth] + KEY_LINE(needle) + haystack[depth:] + QUESTION; the target is
  the needle then EOS; references = (needle,). digits: the length of a "digits" needle.
  max_new_tokens: None = the needle's longest length in characters + 2. meta: length, depth,
  haystack, needle, key, needle_offset (token index of the key line in the prompt).
  """
  if not 0 <= depth <= 1:
    raise CellError(f"depth={depth} is outside [0, 1].")
  if needle not in NEEDLES:
    raise CellError(f"Unknown needle {needle!r}; use one of {NEEDLES}.")
  if max_new_tokens is None:
    max_new_tokens = default_max_new_tokens(needle, digits)
  rng = cell_rng(seed, "niah", length=length, depth=depth, haystack=haystack, needle=needle)
  examples = []
  for _ in range(num):
    key = make_needle(rng, needle, digits)
    prompt, (offset,) = assemble(
        vocab,
        budget=length - max_new_tokens,
        prefix="",
        inserts=[(depth, passkey.KEY_LINE.format(key=key))],
        question=passkey.QUESTION,
        units=haystack_units(haystack, rng),
    )
    meta = dict(length=length, max_new_tokens=max_new_tokens, depth=depth, haystack=haystack,
                needle=needle, key=key, needle_offset=offset)
    examples.append(Example(prompt, target_ids(vocab, key, max_new_tokens), (key,), meta))
  return examples


def _ruler_needles(rng, variant: str, num_needles: int):
  """(keys, values per key, queried key indices) of one RULER NIAH example."""
  num_keys = 1 if variant in ("single", "multivalue") else num_needles
  num_values = num_needles if variant == "multivalue" else 1
  keys = list(dict.fromkeys(make_needle(rng, "words") for _ in range(8 * num_keys)))
  if len(keys) < num_keys:
    raise CellError(f"num_needles={num_needles} is more than the distinct keys available.")
  values = [[str(v) for v in rng.choice(9_000_000, num_values, replace=False) + 1_000_000]
            for _ in range(num_keys)]
  queried = list(range(num_keys)) if variant == "multiquery" else [0]
  return keys[:num_keys], values, queried


def ruler_niah(
    vocab,
    *,
    variant: str = "single",
    length: int,
    num: int,
    seed: int,
    num_needles: int = 4,
    haystack: str = "filler",
    max_new_tokens: int = 64,
) -> list[Example]:
  """RULER's NIAH variants: needles "One of the special magic numbers for KEY is: VALUE."
  at uniform random depths in the haystack, then a question about some keys.

  single: one key, one value. multikey: `num_needles` keys (the others are distractors),
  one queried. multivalue: one key with `num_needles` values, all asked for. multiquery:
  `num_needles` keys, all queried. Keys are adjective-noun words, values 7 digits. Score with
  string_match_all against references (every value asked for). meta: length, variant,
  queries (the keys asked about), depths.
  """
  if variant not in VARIANTS:
    raise CellError(f"Unknown variant {variant!r}; use one of {VARIANTS}.")
  rng = cell_rng(seed, "ruler_niah", length=length, variant=variant, haystack=haystack,
                 num_needles=num_needles)
  examples = []
  for _ in range(num):
    keys, values, queried = _ruler_needles(rng, variant, num_needles)
    pairs = [(k, v) for k, vs in zip(keys, values) for v in vs]
    needles = [RULER_NEEDLE.format(key=k, value=v) for k, v in pairs]
    depths = rng.uniform(0, 1, size=len(needles))
    asked = [keys[q] for q in queried]
    key_text = ", ".join(asked[:-1]) + " and " + asked[-1] if len(asked) > 1 else asked[0]
    prompt, offsets = assemble(
        vocab,
        budget=length - max_new_tokens,
        prefix=RULER_PREFIX,
        inserts=list(zip(depths.tolist(), needles)),
        question=RULER_QUESTION.format(keys=key_text),
        units=haystack_units(haystack, rng),
    )
    # Per asked key, its values in the order the prompt shows them.
    shown = [pairs[i] for i in np.argsort(offsets)]
    references = tuple(v for key in asked for k, v in shown if k == key)
    meta = dict(length=length, max_new_tokens=max_new_tokens, variant=variant,
                haystack=haystack, queries=asked, depths=depths.tolist())
    target = target_ids(vocab, " " + ", ".join(references) + ".", max_new_tokens)
    examples.append(Example(prompt, target, references, meta))
  return examples
