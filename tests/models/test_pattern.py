import dataclasses

import pytest

from lcjax.models.attention import Attention, AttentionConfig
from lcjax.models.config import ModelConfig
from lcjax.models.mamba import Mamba2, MambaConfig
from lcjax.models.mlp import MLP, MLPConfig
from lcjax.models.pattern import MIXERS, parse_pattern


def test_symbols():
  assert {s: m.module for s, m in MIXERS.items()} == {"*": Attention, "-": MLP, "M": Mamba2}
  assert {s: m.config for s, m in MIXERS.items()} == {
      "*": AttentionConfig, "-": MLPConfig, "M": MambaConfig}


def test_every_mixer_reads_a_model_config_field_of_its_class():
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  cfg = ModelConfig()
  for symbol, mixer in MIXERS.items():
    assert mixer.name in fields, symbol
    assert type(cfg.mixer_config(symbol)) is mixer.config, symbol


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
