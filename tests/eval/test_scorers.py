"""String scorers against hand-written cases (RULER's semantics)."""

import pytest

from lcjax.eval.scorers import SCORERS, exact_match, string_match_all, string_match_part


def test_string_match_all_gives_partial_credit_case_insensitively():
  assert string_match_all("The numbers are 123, ABC-Def.", ["123", "abc-def"]) == 1.0
  assert string_match_all("foo and BAR", ["foo", "bar", "baz"]) == pytest.approx(2 / 3)
  assert string_match_all("nothing here", ["foo", "bar"]) == 0.0
  assert string_match_all("", ["foo"]) == 0.0


def test_string_match_part_needs_one_reference():
  assert string_match_part("it is BAR", ["foo", "bar"]) == 1.0
  assert string_match_part("it is baz", ["foo", "bar"]) == 0.0
  assert string_match_part("", ["foo"]) == 0.0


def test_exact_match_strips_but_keeps_case():
  assert exact_match("  12345\n", ["12345"]) == 1.0
  assert exact_match("12345", ["999", " 12345 "]) == 1.0
  assert exact_match("12345 is the key", ["12345"]) == 0.0
  assert exact_match("Foo", ["foo"]) == 0.0
  assert exact_match("", ["foo"]) == 0.0


def test_registry_and_empty_references():
  assert set(SCORERS) == {"string_match_all", "string_match_part", "exact_match"}
  for scorer in SCORERS.values():
    with pytest.raises(ValueError):
      scorer("x", [])
