"""Phonebook lookup (Jelassi et al., "Repeat After Me"): a list of "Name Surname: 555-0123"
lines, then a question about one name; the answer is that name's number.

The length follows from `entries` (not a budget): meta["length"] is the prompt's token count
plus max_new_tokens, the same convention as the length-driven probes.
"""

from lcjax.data.probes.base import CellError, Example, cell_rng, pseudo_words, target_ids

FIRST_NAMES = (
    "Ada", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Kate",
    "Liam", "Maya", "Noah", "Olga", "Paul", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera",
    "Will", "Xena", "Yusuf", "Zoe",
)
PREFIX = "Below is a phone book: each line is a name and its phone number.\n"
LINE = "{name}: {number}\n"
QUESTION = "\nWhat is the phone number of {name}? {name}:"
# Matches one entry of a decoded prompt: group 1 the name, group 2 the number.
LINE_RE = r"([A-Z][a-z]+ [A-Z][a-z]+): (555-\d{4})"


def phonebook(vocab, *, entries: int, num: int, seed: int, max_new_tokens: int = 16):
  """`entries` lines with distinct names (a first name and a pseudo-word surname, each surname
  used once) and distinct numbers; one uniformly drawn entry is asked about.

  meta: entries, length, depth (the asked entry's index / (entries - 1)), name.
  """
  if not 0 < entries <= 10_000:
    raise CellError(f"entries={entries} is outside [1, 10000] (the distinct 555-xxxx numbers).")
  rng = cell_rng(seed, "phonebook", entries=entries)
  examples = []
  for _ in range(num):
    surnames = [w.capitalize() for w in pseudo_words(rng, entries)]
    firsts = rng.integers(0, len(FIRST_NAMES), size=entries)
    names = [f"{FIRST_NAMES[f]} {s}" for f, s in zip(firsts, surnames)]
    numbers = [f"555-{n:04d}" for n in rng.choice(10_000, entries, replace=False)]
    asked = int(rng.integers(entries))
    prompt = vocab.encode(PREFIX)
    for name, number in zip(names, numbers):
      prompt += vocab.encode(LINE.format(name=name, number=number))
    prompt += vocab.encode(QUESTION.format(name=names[asked]))
    meta = dict(length=len(prompt) + max_new_tokens, max_new_tokens=max_new_tokens,
                entries=entries, depth=asked / max(entries - 1, 1), name=names[asked])
    target = target_ids(vocab, " " + numbers[asked], max_new_tokens)
    examples.append(Example(tuple(prompt), target, (numbers[asked],), meta))
  return examples
