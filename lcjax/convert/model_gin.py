"""A gin file reproducing a `ModelConfig`: one binding per field that differs from its default,
so `parse_gin([path])` then `ModelConfig()` gives the same config back."""

import dataclasses
import math

from lcjax.models.config import ModelConfig

_SUB_CONFIGS = ("attention", "mamba", "mlp")  # ModelConfig fields bound through their classes


def _literal(value) -> str:
  """A gin literal for `value` (gin reads Python literals; 1e999 is its float infinity)."""
  if isinstance(value, float) and math.isinf(value):
    return "1e999" if value > 0 else "-1e999"
  if isinstance(value, (tuple, list)):
    items = ", ".join(_literal(v) for v in value)
    return f"({items},)" if len(value) == 1 else f"({items})"
  if isinstance(value, dict):
    return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
  return repr(value)


def _default(field: dataclasses.Field):
  if field.default is not dataclasses.MISSING:
    return field.default
  return field.default_factory()


def changed_bindings(config) -> list[str]:
  """`Class.field = value` for every field of the dataclass `config` not at its default
  (sub-configs of a ModelConfig through their own classes)."""
  lines = []
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if isinstance(config, ModelConfig) and field.name in _SUB_CONFIGS:
      lines += changed_bindings(value)
    elif value != _default(field):
      lines.append(f"{type(config).__name__}.{field.name} = {_literal(value)}")
  return lines


def model_gin(cfg: ModelConfig, header: str = "", extra: list[str] = ()) -> str:
  """The gin text: `header` (comment lines), the model's bindings, then `extra` lines."""
  body = "\n".join(changed_bindings(cfg))
  return "".join(part + "\n" for part in (header.rstrip(), body, *extra) if part)
