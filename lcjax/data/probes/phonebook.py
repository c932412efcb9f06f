"""Phonebook lookup (Jelassi et al., "Repeat After Me") as a probe: the prompts of
lcjax.data.phonebook (the training task's format), by book size.

The length follows from `entries` (not a budget): meta["length"] is the prompt's token count
plus max_new_tokens, the same convention as the length-driven probes.
"""

from lcjax.data import phonebook as book
from lcjax.data.probes.base import CellError, Example, cell_rng, target_ids


def phonebook(vocab, *, entries: int, num: int, seed: int, max_new_tokens: int = 16):
  """`entries` lines (lcjax.data.phonebook.draw_book); one uniformly drawn entry is asked about.

  meta: entries, length, depth (the asked entry's index / (entries - 1)), name.
  """
  if not 0 < entries <= book.MAX_ENTRIES:
    raise CellError(f"entries={entries} is outside [1, {book.MAX_ENTRIES}] (the distinct "
                    "555-xxxx numbers).")
  rng = cell_rng(seed, "phonebook", entries=entries)
  examples = []
  for _ in range(num):
    names, numbers, asked = book.draw_book(rng, entries)
    prompt = [i for piece in book.prompt_pieces(names, numbers, asked)
              for i in vocab.encode(piece)]
    meta = dict(length=len(prompt) + max_new_tokens, max_new_tokens=max_new_tokens,
                entries=entries, depth=asked / max(entries - 1, 1), name=names[asked])
    target = target_ids(vocab, book.answer_text(numbers[asked]), max_new_tokens)
    examples.append(Example(tuple(prompt), target, (numbers[asked],), meta))
  return examples
