"""Scorers of a generated answer against reference strings, each returning a score in [0, 1].

Semantics follow RULER's eval/synthetic/constants.py: string matching is substring search,
case-insensitive; "all" gives partial credit (the fraction of references found), "part"
gives full credit when any reference is found. `exact_match` is the strict one: the stripped
prediction must equal one of the stripped references, case and all.
"""
from typing import Callable, Sequence


def _found(prediction: str, references: Sequence[str]) -> list[bool]:
  if not references:
    raise ValueError("A scorer needs at least one reference string.")
  prediction = prediction.lower()
  return [r.lower() in prediction for r in references]


def string_match_all(prediction: str, references: Sequence[str]) -> float:
  """Fraction of the references found in the prediction (RULER's NIAH, VT, CWE, FWE)."""
  found = _found(prediction, references)
  return sum(found) / len(found)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
  """1.0 if any reference is found in the prediction, else 0.0 (RULER's QA tasks)."""
  return float(any(_found(prediction, references)))


def exact_match(prediction: str, references: Sequence[str]) -> float:
  """1.0 if the prediction, stripped of surrounding whitespace, equals any stripped reference
  (case-sensitive), else 0.0."""
  if not references:
    raise ValueError("A scorer needs at least one reference string.")
  return float(prediction.strip() in {r.strip() for r in references})


SCORERS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "exact_match": exact_match,
}
