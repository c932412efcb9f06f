"""Layer patterns from target ratios, spacing layer types evenly (Megatron's hybrid allocation).

    hybrid_pattern(num_layers=56, attention_ratio=4/56, mlp_ratio=0.5)
    -> 24 "M", 4 "*", 28 "-": attention evenly spaced with Mamba runs before the first and
       after the last, then MLPs spread evenly over the remaining Mamba slots.

In gin: `ModelConfig.pattern = @hybrid_pattern()` with `hybrid_pattern.num_layers = ...`.
"""

import gin

from lcjax.errors import ConfigError


def _spread(slots: list[bool], count: int, gap: float) -> list[bool]:
  """Marks `count` of the True `slots`, one after every ~`gap` unmarked ones.

  A running budget starts at `gap`; each slot either spends one unit of it or, once less than
  half a unit is left, is marked and refills it by `gap`. Rounding at 0.5 keeps the runs
  between marks within one slot of each other.
  """
  marked = [False] * len(slots)
  budget = gap
  for i, free in enumerate(slots):
    if not free or count == 0:
      continue
    if budget < 0.5:
      marked[i], budget, count = True, budget + gap, count - 1
    else:
      budget -= 1
  return marked


@gin.configurable
def hybrid_pattern(num_layers: int, attention_ratio: float, mlp_ratio: float) -> str:
  """A pattern of `num_layers` symbols with round(ratio·num_layers) "*" and "-", the rest "M"."""
  if num_layers < 1 or attention_ratio < 0 or mlp_ratio < 0 or attention_ratio + mlp_ratio > 1:
    raise ConfigError(
        f"hybrid_pattern(num_layers={num_layers}, attention_ratio={attention_ratio}, "
        f"mlp_ratio={mlp_ratio}): need num_layers >= 1, ratios >= 0 and attention_ratio + "
        "mlp_ratio <= 1 (the rest are Mamba layers).")
  n_attention = round(num_layers * attention_ratio)
  n_mlp = round(num_layers * mlp_ratio)
  n_mamba = num_layers - n_attention
  # Attention: n_attention + 1 equal Mamba runs around n_attention attention layers.
  attention = _spread([True] * num_layers, n_attention, n_mamba / (n_attention + 1))
  # MLP: replace Mamba layers evenly, the first after one full gap (right-justified).
  mamba_slots = [not a for a in attention]
  mlp = _spread(mamba_slots, n_mlp, (n_mamba - n_mlp) / n_mlp) if n_mlp else [False] * num_layers
  return "".join("*" if a else "-" if m else "M" for a, m in zip(attention, mlp))
