"""Phonebook lookup (Jelassi et al. 2024, "Repeat After Me"): a list of "Name Surname: 555-0123"
lines, then a question about one name; the answer is that name's number.

  prompt = "Below is a phone book: ...\nAda Bokitu: 555-0123\n...\n"
           "What is the phone number of Ada Bokitu? Ada Bokitu:"
  answer = " 555-0123"

This module holds the format and draws the books; the training task `lcjax_phonebook` and the
suite's probe (lcjax/data/probes/phonebook.py) both ask these prompts. Each surname is used once
in a book, so the surname alone identifies the entry: the model must find the asked name among
the lines and copy the 4 digits after it.
"""
import dataclasses

import gin
import numpy as np

from lcjax.config import check_types
from lcjax.data.splits import split_draws
from lcjax.data.words import pseudo_words
from lcjax.errors import ConfigError

FIRST_NAMES = (
    "Ada", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Kate",
    "Liam", "Maya", "Noah", "Olga", "Paul", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera",
    "Will", "Xena", "Yusuf", "Zoe",
)
SURNAME_SYLLABLES = 3
PREFIX = "Below is a phone book: each line is a name and its phone number.\n"
LINE = "{name}: {number}\n"
QUESTION = "\nWhat is the phone number of {name}? {name}:"
# Matches one entry of a decoded prompt: group 1 the name, group 2 the number.
LINE_RE = r"([A-Z][a-z]+ [A-Z][a-z]+): (555-\d{4})"
MAX_ENTRIES = 10_000  # the distinct 555-xxxx numbers


def draw_book(rng: np.random.Generator, entries: int) -> tuple[list[str], list[str], int]:
  """`entries` distinct names (a first name and a pseudo-word surname, each surname used once)
  with distinct numbers, and the index of the entry asked about (uniform)."""
  surnames = [w.capitalize() for w in pseudo_words(rng, entries, SURNAME_SYLLABLES)]
  firsts = rng.integers(0, len(FIRST_NAMES), size=entries)
  names = [f"{FIRST_NAMES[f]} {s}" for f, s in zip(firsts, surnames)]
  numbers = [f"555-{n:04d}" for n in rng.choice(MAX_ENTRIES, entries, replace=False)]
  return names, numbers, int(rng.integers(entries))


def prompt_pieces(names: list[str], numbers: list[str], asked: int) -> list[str]:
  """The prompt as pieces (the prefix, one per line, the question): joined, the prompt text;
  encoded one by one, a probe's token-exact prompt."""
  lines = [LINE.format(name=name, number=number) for name, number in zip(names, numbers)]
  return [PREFIX, *lines, QUESTION.format(name=names[asked])]


def answer_text(number: str) -> str:
  return " " + number


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PhonebookConfig:
  """min_entries / max_entries: each book's size is uniform in [min_entries, max_entries]."""
  min_entries: int = 4
  max_entries: int = 16
  num_train: int = 20000
  num_validation: int = 256
  train_seed: int = 7
  validation_seed: int = 8

  def __post_init__(self):
    check_types(self)  # a wrong-typed gin binding fails here, naming it
    if not 1 <= self.min_entries <= self.max_entries <= MAX_ENTRIES:
      raise ConfigError(
          f"PhonebookConfig needs 1 <= min_entries ({self.min_entries}) <= max_entries "
          f"({self.max_entries}) <= {MAX_ENTRIES}. Fix: adjust them.")


def example_bytes(cfg: PhonebookConfig) -> int:
  """Byte length of the longest example (without EOS): every name as long as names get."""
  name = "x" * (max(map(len, FIRST_NAMES)) + 1 + 2 * SURNAME_SYLLABLES)
  number = "555-0000"
  pieces = prompt_pieces([name] * cfg.max_entries, [number] * cfg.max_entries, 0)
  return len("".join(pieces)) + len(answer_text(number))


def generate(cfg: PhonebookConfig, split: str):
  """Generates a split deterministically from its seed.

  Returns (segments [n, 2] str: prompt, answer; loss [n, 2] int32: on the answer).
  """
  n, rng = split_draws(cfg, split)
  segments = []
  for entries in rng.integers(cfg.min_entries, cfg.max_entries + 1, size=n):
    names, numbers, asked = draw_book(rng, int(entries))
    segments.append(["".join(prompt_pieces(names, numbers, asked)), answer_text(numbers[asked])])
  return np.array(segments, dtype=object), np.tile(np.array([[0, 1]], np.int32), (n, 1))
