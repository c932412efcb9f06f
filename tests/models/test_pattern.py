import pytest

from lcjax.models.attention import Attention
from lcjax.models.layers import MLP
from lcjax.models.mamba import Mamba2
from lcjax.models.pattern import MIXERS, parse_pattern


def test_symbols():
  assert MIXERS == {"*": Attention, "-": MLP, "M": Mamba2}


@pytest.mark.parametrize("pattern, expected", [
    ("*", ("*",)),
    ("-", ("-",)),
    ("*-*-", ("*", "-", "*", "-")),
    ("**--*", ("*", "*", "-", "-", "*")),
    ("M*M-", ("M", "*", "M", "-")),
])
def test_valid(pattern, expected):
  assert parse_pattern(pattern) == expected


def test_empty():
  with pytest.raises(ValueError, match="Empty"):
    parse_pattern("")


@pytest.mark.parametrize("pattern, bad, position", [("*-x-", "x", 2), ("A", "A", 0),
                                                    ("*- ", " ", 2)])
def test_unknown_symbol(pattern, bad, position):
  with pytest.raises(ValueError) as e:
    parse_pattern(pattern)
  msg = str(e.value)
  assert repr(bad) in msg and f"position {position}" in msg and "'*', '-'" in msg
