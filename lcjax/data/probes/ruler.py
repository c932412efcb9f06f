"""RULER's aggregation and tracing tasks, adapted: variable tracking (VT), common words
extraction (CWE) and frequent words extraction (FWE). All are scored with string_match_all.

Words are deterministic pseudo-words (lcjax.data.words): nothing is downloaded, and they are
unlikely to collide with the haystack's own words.
"""
import collections
import string

import numpy as np

from lcjax.data.probes.base import (
    Example,
    assemble,
    cell_rng,
    filler_ids,
    fit_count,
    haystack_units,
    target_ids,
)
from lcjax.data.words import pseudo_words

VT_PREFIX = "Track the chains of variable assignments hidden in the text below.\n"
VT_QUESTION = (
    "\nQuestion: Find all variables that are assigned the value {value} in the text above. "
    "Answer: Following the chains of assignments in the text above, {n} variables are "
    "assigned the value {value}, they are:"
)
# Matches one assignment of a decoded VT prompt: group 1 the variable, 2 a number or 3 a variable.
VT_RE = r"VAR ([A-Z]{5}) = (?:(\d{5})|VAR ([A-Z]{5}))\."
CWE_PREFIX = (
    "Below is a numbered list of words. Some of them appear more often than the others; "
    "memorize those.\n"
)
CWE_QUESTION = (
    "\nQuestion: What are the {k} most common words in the list above? "
    "Answer: The {k} words that appear most often in the list are:"
)
FWE_PREFIX = (
    "Read the coded text below and keep count of each coded word. "
    "Find the three most frequent coded words.\n"
)
FWE_QUESTION = (
    "\nQuestion: What are the three most frequent words in the coded text above? "
    "Answer: The three most frequent words in the coded text above are:"
)


def _variable_names(rng: np.random.Generator, n: int) -> list[str]:
  names: dict[str, None] = {}
  while len(names) < n:
    names["".join(rng.choice(list(string.ascii_uppercase), size=5))] = None
  return list(names)


def variable_tracking(
    vocab,
    *,
    length: int,
    num: int,
    seed: int,
    num_chains: int = 1,
    num_hops: int = 4,
    haystack: str = "filler",
    max_new_tokens: int = 48,
) -> list[Example]:
  """Chains "VAR X1 = 12345." "VAR X2 = VAR X1." ... (num_hops + 1 variables each) at sorted
  random depths of the haystack; the question names chain 0's value, and the answer is every
  variable of that chain (the other chains, with other values, distract).

  meta: length, num_chains, num_hops, value (the queried number).
  """
  rng = cell_rng(seed, "variable_tracking", length=length, num_chains=num_chains,
                 num_hops=num_hops, haystack=haystack)
  examples = []
  for _ in range(num):
    names = _variable_names(rng, num_chains * (num_hops + 1))
    chains = [names[c * (num_hops + 1):(c + 1) * (num_hops + 1)] for c in range(num_chains)]
    values = [str(v) for v in rng.choice(90_000, num_chains, replace=False) + 10_000]
    statements = []
    for chain, value in zip(chains, values):
      statements.append(f"VAR {chain[0]} = {value}. ")
      statements += [f"VAR {b} = VAR {a}. " for a, b in zip(chain[:-1], chain[1:])]
    # Interleave the chains at random, each chain's statements staying in order.
    chain_of = rng.permutation(np.repeat(np.arange(num_chains), num_hops + 1))
    queues = [collections.deque(statements[c * (num_hops + 1):(c + 1) * (num_hops + 1)])
              for c in range(num_chains)]
    ordered = [queues[c].popleft() for c in chain_of]
    depths = np.sort(rng.uniform(0, 1, size=len(statements)))
    prompt, _ = assemble(
        vocab,
        budget=length - max_new_tokens,
        prefix=VT_PREFIX,
        inserts=list(zip(depths.tolist(), ordered)),
        question=VT_QUESTION.format(value=values[0], n=num_hops + 1),
        units=haystack_units(haystack, rng),
    )
    references = tuple(chains[0])
    meta = dict(length=length, max_new_tokens=max_new_tokens, num_chains=num_chains,
                num_hops=num_hops, value=values[0])
    target = target_ids(vocab, " " + " ".join(references), max_new_tokens)
    examples.append(Example(prompt, target, references, meta))
  return examples


def _list_prompt(vocab, budget, prefix, build, hi, question, max_new_tokens):
  """prefix + the largest `build(n)` (n <= hi) that fits + filler pad + question: exactly
  `budget` tokens. Returns (prompt ids, n). The pad goes after the list, so the list itself
  reads unbroken, and is too short to outweigh the list's counts."""
  head, tail = vocab.encode(prefix), vocab.encode(question)
  room = budget - len(head) - len(tail)
  n, body = fit_count(build, room, 0, hi)
  return tuple(head + body + filler_ids(vocab, room - len(body)) + tail), n


def _encoded(vocab, cache: dict, text: str) -> list[int]:
  if text not in cache:
    cache[text] = vocab.encode(text)
  return cache[text]


def common_words(
    vocab,
    *,
    length: int,
    num: int,
    seed: int,
    num_common: int = 10,
    freq_common: int = 30,
    freq_uncommon: int = 3,
    max_new_tokens: int = 128,
) -> list[Example]:
  """CWE: a numbered list ("1. bakodu") where `num_common` words appear `freq` times each and
  as many other words as fit appear `freq_uncommon` times; the answer is the common words.

  freq is `freq_common`, lowered (not below freq_uncommon + 1) until the common words take
  at most half the list's room, so short contexts still hold uncommon words. meta: length,
  freq (the common words' count), num_uncommon.
  """
  rng = cell_rng(seed, "common_words", length=length, num_common=num_common,
                 freq_common=freq_common, freq_uncommon=freq_uncommon)
  budget, question = length - max_new_tokens, CWE_QUESTION.format(k=num_common)
  hi = budget // (2 * freq_uncommon)
  examples = []
  for _ in range(num):
    words = pseudo_words(rng, num_common + hi)
    common, perm_seed, cache = words[:num_common], int(rng.integers(2**31)), {}

    def build(n, freq):
      listed = common * freq + words[num_common:num_common + n] * freq_uncommon
      order = np.random.default_rng(perm_seed).permutation(len(listed))
      # Number and word encoded apart: each is encoded once, however often the search builds.
      return [t for i, j in enumerate(order)
              for part in (f"{i + 1}. ", listed[j] + "\n") for t in _encoded(vocab, cache, part)]

    room = budget - len(vocab.encode(CWE_PREFIX)) - len(vocab.encode(question))
    fits = (f for f in range(freq_common, freq_uncommon, -1) if len(build(0, f)) <= room // 2)
    freq = next(fits, freq_uncommon + 1)
    prompt, n = _list_prompt(vocab, budget, CWE_PREFIX, lambda n: build(n, freq), hi, question,
                             max_new_tokens)
    meta = dict(length=length, max_new_tokens=max_new_tokens, freq=freq, num_uncommon=n)
    target = target_ids(vocab, " " + " ".join(common), max_new_tokens)
    examples.append(Example(prompt, target, tuple(common), meta))
  return examples


def zipf_counts(n: int, num_words: int, alpha: float) -> np.ndarray:
  """Counts of `num_words` ranks in a stream of about n words, Zipf(alpha) expected values,
  with the top three strictly ahead (ranks 1 > 2 > 3 > every other, 3rd at least 2)."""
  p = np.arange(1, num_words + 1, dtype=np.float64) ** -alpha
  counts = np.floor(n * p / p.sum()).astype(int)
  counts[2] = max(counts[2], counts[3:].max() + 1, 2)
  counts[1] = max(counts[1], counts[2] + 1)
  counts[0] = max(counts[0], counts[1] + 1)
  return counts


def frequent_words(
    vocab,
    *,
    length: int,
    num: int,
    seed: int,
    num_words: int = 100,
    alpha: float = 2.0,
    max_new_tokens: int = 48,
) -> list[Example]:
  """FWE: a stream of coded pseudo-words with Zipf(alpha) frequencies, as long as fits; the
  answer is the three most frequent, most frequent first. meta: length, num_stream (words in
  the stream), counts (of the top three)."""
  rng = cell_rng(seed, "frequent_words", length=length, num_words=num_words, alpha=alpha)
  budget = length - max_new_tokens
  examples = []
  for _ in range(num):
    words = pseudo_words(rng, num_words)
    perm_seed, cache = int(rng.integers(2**31)), {}

    def build(n):
      stream = np.repeat(np.arange(num_words), zipf_counts(n, num_words, alpha))
      stream = np.random.default_rng(perm_seed).permutation(stream)
      return [t for w in stream for t in _encoded(vocab, cache, words[w] + " ")]

    prompt, n = _list_prompt(vocab, budget, FWE_PREFIX, build, budget, FWE_QUESTION,
                             max_new_tokens)
    top = tuple(words[:3])
    counts = zipf_counts(n, num_words, alpha)
    meta = dict(length=length, max_new_tokens=max_new_tokens, num_stream=int(counts.sum()),
                counts=counts[:3].tolist())
    examples.append(Example(prompt, target_ids(vocab, " " + " ".join(top), max_new_tokens), top,
                            meta))
  return examples
