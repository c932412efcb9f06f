"""Long-context probe generators: each takes a vocabulary, a cell, `num` and a `seed`, and
returns a list of base.Example, deterministic in (seed, cell), with token-exact lengths.

The evaluation suite (lcjax/eval/suite.py) names and wraps them.
"""
from lcjax.data.probes.base import CellError, Example
from lcjax.data.probes.mqar import mqar
from lcjax.data.probes.needle import niah, ruler_niah
from lcjax.data.probes.phonebook import phonebook
from lcjax.data.probes.ruler import common_words, frequent_words, variable_tracking

__all__ = [
    "CellError",
    "Example",
    "common_words",
    "frequent_words",
    "mqar",
    "niah",
    "phonebook",
    "ruler_niah",
    "variable_tracking",
]
