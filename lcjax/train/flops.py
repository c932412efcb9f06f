"""Model FLOPs per token, from the architecture, for MFU.

Counts matmuls only (2 FLOPs per multiply-add), as the PaLM / Megatron MFU convention does:
training = 3 x forward (forward, and backward for activations and for weights). Rematerialised
recomputation is not counted: MFU measures useful work. Causal attention is counted at its real
cost: the query at position i attends to i+1 keys, so on average (seq+1)/2 per token over a full
row of length `seq`.
"""

from lcjax.models.config import ModelConfig
from lcjax.models.pattern import parse_pattern


def _attention(cfg: ModelConfig, seq_len: int) -> float:
  q_and_o = 2 * cfg.d_model * cfg.num_heads * cfg.head_dim
  k_and_v = 2 * cfg.d_model * cfg.num_kv_heads * cfg.head_dim
  projections = 2 * (q_and_o + k_and_v)
  mean_keys = (seq_len + 1) / 2
  scores_and_values = 2 * 2 * cfg.num_heads * cfg.head_dim * mean_keys
  return projections + scores_and_values


def _mlp(cfg: ModelConfig, seq_len: int) -> float:
  return 2 * 3 * cfg.d_model * cfg.mlp_dim  # gate, up, down


# One entry per layer-pattern symbol; a new mixer adds its forward FLOPs per token here.
FORWARD_FLOPS_PER_TOKEN = {"*": _attention, "-": _mlp}


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  layers = sum(FORWARD_FLOPS_PER_TOKEN[s](cfg, seq_len) for s in parse_pattern(cfg.pattern))
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
