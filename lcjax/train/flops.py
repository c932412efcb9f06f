"""Model FLOPs per token, from the architecture, for MFU.

Counts matmuls only (2 FLOPs per multiply-add), as the PaLM / Megatron MFU convention does:
training = 3 x forward (forward, and backward for activations and for weights). Rematerialised
recomputation is not counted: MFU measures useful work. Causal attention is counted at its real
cost: the query at position i attends to i+1 keys, so on average (seq+1)/2 per token over a full
row of length `seq`. Each mixer's count is its registry entry's `flops`
(`lcjax.models.pattern.MIXERS`), next to its module.
"""

from lcjax.models.config import ModelConfig
from lcjax.models.pattern import MIXERS, parse_pattern


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Each block's mixer's FLOPs (`lcjax.models.pattern.MIXERS`), plus the LM head."""
  layers = sum(MIXERS[s].flops(cfg.mixer_config(s), cfg.d_model, seq_len)
               for s in parse_pattern(cfg.pattern))
  lm_head = 2 * cfg.d_model * cfg.vocab_size
  return layers + lm_head


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  return 3 * forward_flops_per_token(cfg, seq_len)


# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets; used when
# TrainConfig.peak_flops_per_device is not set.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in device_kind.lower():
      return flops
  return None
