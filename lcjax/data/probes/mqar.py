"""Multi-query associative recall as a long-context probe (zoology's multiquery_ar, in the
text format of lcjax.data.mqar): "abc:17 qrs:03 ... | " then a haystack in which the queries
sit at power-law distributed gaps (most near the pairs, a long tail far away).

Protocol. Every query but the last is answered in the prompt ("xyz:92", the value written
out), so teacher forcing can score each of them: meta["value_spans"] gives the token span
[start, end) of each such value in the prompt. The prompt ends with the last query's key and
colon ("abc:"), at the very end of the context, and the target is its value then EOS: the
generated answer is the farthest recall of the example.
"""
import numpy as np

from lcjax.data import mqar as mqar_task
from lcjax.data.probes.base import (CellError, Example, assemble, cell_rng, haystack_units,
                                     target_ids)


def power_law_depths(rng: np.random.Generator, n: int, power_a: float, space: int = 1024):
  """n distinct gaps among `space` slots drawn with p(x) ~ x**(power_a - 1) (zoology's
  law), as sorted fractions of the haystack in [0, 1)."""
  p = np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
  return np.sort(rng.choice(space, size=n, replace=False, p=p / p.sum())) / space


def mqar(
    vocab,
    *,
    length: int,
    num_pairs: int,
    num: int,
    seed: int,
    num_queries: int | None = None,
    power_a: float = 0.01,
    haystack: str = "filler",
    max_new_tokens: int = 4,
) -> list[Example]:
  """`num_pairs` key-value pairs (keys distinct 3-letter, values distinct 2-digit), then
  `num_queries` (default: all) of the keys queried in random order in a haystack.

  references = (the last query's value,). meta: length, num_pairs, num_queries, queries
  ([(key, value)] in prompt order, the last one asked at the end), value_spans.
  """
  num_queries = num_pairs if num_queries is None else num_queries
  if not 0 < num_queries <= num_pairs <= len(mqar_task.VALUE_TEXT):
    raise CellError(
        f"mqar needs 1 <= num_queries ({num_queries}) <= num_pairs ({num_pairs}) <= "
        f"{len(mqar_task.VALUE_TEXT)} (distinct values)."
    )
  rng = cell_rng(seed, "mqar", length=length, num_pairs=num_pairs, num_queries=num_queries,
                 power_a=power_a, haystack=haystack)
  examples = []
  for _ in range(num):
    keys = [mqar_task.KEY_TEXT[c] for c in mqar_task.unique_keys(rng, 1, num_pairs)[0]]
    values = [mqar_task.VALUE_TEXT[v] for v in rng.choice(100, num_pairs, replace=False)]
    queries = rng.permutation(num_pairs)[:num_queries].tolist()
    depths = power_law_depths(rng, num_queries - 1, power_a).tolist()
    # Each inline query is three inserts at one depth (key, value, space): the value's tokens
    # are then exactly one insert, whose span teacher forcing can score.
    inserts = [(d, text) for d, q in zip(depths, queries)
               for text in (keys[q] + ":", values[q], " ")]
    pairs = " ".join(f"{k}:{v}" for k, v in zip(keys, values))
    last = queries[-1]
    prompt, offsets = assemble(
        vocab,
        budget=length - max_new_tokens,
        prefix=pairs + mqar_task.SEPARATOR,
        inserts=inserts,
        question=" " + keys[last] + ":",
        units=haystack_units(haystack, rng),
    )
    value_spans = [(offsets[i], offsets[i + 1]) for i in range(1, len(inserts), 3)]
    meta = dict(length=length, max_new_tokens=max_new_tokens, num_pairs=num_pairs,
                num_queries=num_queries, queries=[(keys[q], values[q]) for q in queries],
                value_spans=value_spans)
    examples.append(Example(prompt, target_ids(vocab, values[last], max_new_tokens),
                            (values[last],), meta))
  return examples
