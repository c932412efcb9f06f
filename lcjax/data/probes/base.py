"""What every probe shares: the Example record, seeded randomness per cell, haystack sources,
and token-exact assembly of a prompt (pieces encoded separately, haystack cut to the count).

Lengths are in tokens of the given vocabulary, RULER's convention: `length` is the whole
context budget, so a length-driven probe's prompt has exactly `length - max_new_tokens`
tokens and its target (answer then EOS) at most `max_new_tokens`.

A character the vocabulary lacks (the Shakespeare-trained SentencePiece model has no "=" or
"|") encodes as its unknown id: the prompt keeps its length and its structure, the model
just sees the same unknown token wherever that character stands.
"""
import dataclasses
import itertools
import zlib
from typing import Iterable, Iterator, Sequence

import numpy as np

from lcjax.data import passkey, shakespeare

HAYSTACKS = ("filler", "play")
# Small fixed word lists (needles "words", RULER-style keys "adjective-noun").
ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "fierce", "gentle", "hollow", "icy", "jolly",
    "keen", "lively", "misty", "noble", "odd", "proud", "quiet", "rusty", "silent", "tender",
)
NOUNS = (
    "anchor", "badger", "candle", "dragon", "ember", "falcon", "garden", "harbor", "island",
    "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pebble", "quarry", "river",
    "saddle", "tower",
)


class CellError(ValueError):
  """A probe cell its generator cannot build: a length too short for the task's fixed text, an
  unknown needle or haystack, more entries than distinct values."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One probe example.

  prompt: token ids (no BOS); `length - max_new_tokens` of them for length-driven probes.
  target: the answer as the model should write it, then EOS (what teacher forcing scores).
  references: reference strings (RULER's "outputs") for the string scorers.
  meta: the cell (e.g. {"length": 1024, "depth": 0.3}), "max_new_tokens" (the generation
    budget the prompt was cut for), plus what an oracle needs.
  """

  prompt: tuple[int, ...]
  target: tuple[int, ...]
  references: tuple[str, ...]
  meta: dict


def cell_rng(seed: int, name: str, **cell) -> np.random.Generator:
  """A generator determined by (seed, probe name, cell): the same cell always draws the same
  examples, and neighbouring cells do not share draws."""
  key = zlib.crc32(f"{name}:{sorted(cell.items())}".encode())
  return np.random.default_rng([seed, key])


def target_ids(vocab, answer: str, max_new_tokens: int) -> tuple[int, ...]:
  """`answer` then EOS, checked to fit the generation budget."""
  ids = tuple(vocab.encode(answer)) + (vocab.eos_id,)
  if len(ids) > max_new_tokens:
    raise CellError(
        f"Answer {answer!r} takes {len(ids)} tokens with EOS, over max_new_tokens="
        f"{max_new_tokens}. Fix: raise max_new_tokens."
    )
  return ids


def haystack_units(source: str, rng: np.random.Generator) -> Iterator[str]:
  """Endless haystack text in units (sentences or lines) where a needle may go between.

  "filler": passkey.FILLER's sentences, repeated (the training passkey task's haystack).
  "play": the lines of one held-out (validation) Shakespeare play from a seed-dependent line
    onwards, wrapping around; these plays never appear in the training split.
  """
  if source == "filler":
    return itertools.cycle([s + ". " for s in passkey.FILLER.split(". ") if s.strip()])
  if source == "play":
    plays = shakespeare.split_texts("validation")
    lines = plays[int(rng.integers(len(plays)))].splitlines(keepends=True)
    start = int(rng.integers(len(lines)))
    return itertools.cycle(lines[start:] + lines[:start])
  raise CellError(f"Unknown haystack {source!r}; use one of {HAYSTACKS}.")


def cut_haystack(vocab, units: Iterable[str], count: int) -> tuple[list[int], list[int]]:
  """Exactly `count` haystack tokens, and the token offsets where a unit starts (0 .. count).

  Units are encoded one by one (so their boundaries are token boundaries for any
  vocabulary); the last unit is cut at a token.
  """
  tokens, bounds, cache = [], [0], {}
  for unit in units:
    if len(tokens) >= count:
      break
    if unit not in cache:
      cache[unit] = vocab.encode(unit)
    tokens += cache[unit]
    bounds.append(min(len(tokens), count))
  return tokens[:count], sorted(set(bounds))


def filler_ids(vocab, count: int) -> list[int]:
  """`count` tokens of passkey filler: pads a list-shaped prompt to its exact length."""
  return cut_haystack(vocab, haystack_units("filler", None), count)[0]


def assemble(
    vocab,
    *,
    budget: int,
    prefix: str,
    inserts: Sequence[tuple[float, str]],
    question: str,
    units: Iterable[str],
) -> tuple[tuple[int, ...], list[int]]:
  """prefix + haystack with inserts + question, exactly `budget` tokens.

  inserts: (depth, text) pairs; depth in [0, 1] is the fraction of the haystack before the
    text, rounded to the nearest unit boundary. Inserts sharing a boundary keep their order.
  Returns (prompt ids, token offset of each insert in the prompt).
  """
  head, tail = vocab.encode(prefix), vocab.encode(question)
  pieces = [vocab.encode(text) for _, text in inserts]
  count = budget - len(head) - len(tail) - sum(map(len, pieces))
  if count < 0:
    raise CellError(
        f"A prompt budget of {budget} tokens cannot hold the probe's fixed text "
        f"({budget - count} tokens). Fix: raise length (or lower max_new_tokens)."
    )
  hay, bounds = cut_haystack(vocab, units, count)
  bounds = np.asarray(bounds)
  cuts = [int(bounds[np.argmin(np.abs(bounds - d * count))]) for d, _ in inserts]
  # 1. Walk the haystack, emitting each insert at its boundary (stable for equal cuts).
  prompt, offsets, done = list(head), [0] * len(inserts), 0
  for i in sorted(range(len(inserts)), key=lambda i: cuts[i]):
    prompt += hay[done:cuts[i]]
    done = cuts[i]
    offsets[i] = len(prompt)
    prompt += pieces[i]
  prompt += hay[done:] + tail
  assert len(prompt) == budget, (len(prompt), budget)
  return tuple(prompt), offsets


def fit_count(build, budget: int, lo: int, hi: int) -> tuple[int, list[int]]:
  """The largest n in [lo, hi] whose `build(n)` (token ids) fits in `budget`, and its ids.

  `build` grows (about) monotonically with n; a binary search finds the edge.
  """
  best = build(lo)
  if len(best) > budget:
    raise CellError(
        f"A prompt budget of {budget} tokens cannot hold even the smallest instance "
        f"({len(best)} tokens). Fix: raise length (or lower max_new_tokens)."
    )
  while lo < hi:
    mid = (lo + hi + 1) // 2
    ids = build(mid)
    if len(ids) <= budget:
      lo, best = mid, ids
    else:
      hi = mid - 1
  return lo, best
