"""Layer patterns in Megatron's hybrid notation: one symbol per block.

"*-*-" is attention, MLP, attention, MLP; "M" is a Mamba-2 mixer. Each symbol maps to a mixer factory
`factory(cfg, *, rngs, sequence=None)` (sequence: a `lcjax.parallel.sequence.SequenceSharding`
when rows are split over devices) whose module is called as `mixer(x, *, segment_ids, positions)`;
a new mixer is one entry in `MIXERS`. For decoding, every mixer also has
`init_cache(batch, max_len)`, `prefill(x, cache, *, positions)` and `step(x_t, cache)`.
"""

from lcjax.models.attention import Attention
from lcjax.models.layers import MLP
from lcjax.models.mamba import Mamba2

MIXERS = {
    "*": Attention,
    "-": MLP,
    "M": Mamba2,
}


def parse_pattern(pattern: str) -> tuple[str, ...]:
  """"*-*-" -> ("*", "-", "*", "-"); raises ValueError on an empty pattern or unknown symbol."""
  allowed = ", ".join(repr(s) for s in MIXERS)
  if not pattern:
    raise ValueError(f"Empty layer pattern: give one symbol per block from {allowed}.")
  for i, symbol in enumerate(pattern):
    if symbol not in MIXERS:
      raise ValueError(f"Unknown symbol {symbol!r} at position {i} of layer pattern "
                       f"{pattern!r}; allowed symbols: {allowed}.")
  return tuple(pattern)
