"""Layer patterns in Megatron's hybrid notation, and the one registry of mixers they name.

"*-*-" is attention, MLP, attention, MLP; "M" is a Mamba-2 mixer. Each symbol has one entry in
`MIXERS`: its module, the sub-config it reads (the `ModelConfig` field named `name`, of class
`config`) and its forward FLOPs per token. A new mixer is one entry here, one sub-config field
in `ModelConfig`, and a module with the mixers' interface:

    module(config, wide, *, rngs, ops)            wide: `lcjax.models.layers.ModelWide`;
                                                  ops: `lcjax.kernels.ops.LocalOps` or a
                                                  `lcjax.parallel.sequence.SequenceSharding`
    mixer(x, *, segment_ids, positions) -> y      x, y `[batch, seq, d_model]`
    init_cache(batch, max_len), prefill(x, cache, *, segment_ids, positions),
    step(x_t, cache)                              (decoding)

Parameter counts come from the modules themselves (`lcjax.models.report.counted_params`).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

from lcjax.errors import ConfigError
from lcjax.models.attention import Attention, AttentionConfig, attention_flops
from lcjax.models.mamba import Mamba2, MambaConfig, mamba_flops
from lcjax.models.mlp import MLP, MLPConfig, mlp_flops


@dataclasses.dataclass(frozen=True)
class Mixer:
  """One layer-pattern symbol's mixer."""
  name: str  # the ModelConfig field holding its sub-config; also its name in messages
  module: type  # built as module(sub_config, wide, *, rngs, ops)
  config: type  # the sub-config's class
  flops: Callable[[Any, int, int], float]  # (sub_config, d_model, seq_len) -> forward / token
  # (sub_config, d_model) -> None, raising where the sub-config does not fit the model's width;
  # run only for patterns that use the mixer.
  check_d_model: Callable[[Any, int], None] | None = None


MIXERS = {
    "*": Mixer("attention", Attention, AttentionConfig, attention_flops),
    "-": Mixer("mlp", MLP, MLPConfig, mlp_flops),
    "M": Mixer("mamba", Mamba2, MambaConfig, mamba_flops, MambaConfig.check_d_model),
}


def parse_pattern(pattern: str) -> tuple[str, ...]:
  """"*-*-" -> ("*", "-", "*", "-"); raises ConfigError on an empty pattern or unknown symbol."""
  allowed = ", ".join(repr(s) for s in MIXERS)
  if not pattern:
    raise ConfigError(f"Empty layer pattern: give one symbol per block from {allowed}.")
  for i, symbol in enumerate(pattern):
    if symbol not in MIXERS:
      raise ConfigError(f"Unknown symbol {symbol!r} at position {i} of layer pattern "
                        f"{pattern!r}; allowed symbols: {allowed}.")
  return tuple(pattern)
