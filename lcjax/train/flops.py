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


def _mamba2(cfg: ModelConfig, seq_len: int) -> float:
  """Projections, the depthwise conv, and the chunked SSD (chunk length Q, causal within).

  Per token and head (head_dim P, state N, G groups): intra-chunk C·Bᵀ scores (per group) and
  their weighted sum of x, both over (Q+1)/2 earlier positions on average; the token's
  contribution to its chunk's state (x ⊗ B) and the incoming state's output (C·h), P·N each.
  Inter-chunk state passing is O(P·N) per chunk, negligible per token.
  """
  d = cfg.d_model
  d_inner = cfg.mamba_expand * d
  heads = d_inner // cfg.mamba_headdim
  bc = cfg.mamba_ngroups * cfg.mamba_d_state
  projections = 2 * d * (2 * d_inner + 2 * bc + heads) + 2 * d_inner * d  # in (z,x,B,C,dt), out
  conv = 2 * (d_inner + 2 * bc) * cfg.mamba_d_conv
  q = min(cfg.mamba_chunk_size, seq_len)
  mean_keys = (q + 1) / 2
  scores = 2 * cfg.mamba_ngroups * cfg.mamba_d_state * mean_keys
  mix = 2 * d_inner * mean_keys
  states = 2 * 2 * d_inner * cfg.mamba_d_state
  return projections + conv + scores + mix + states


# One entry per layer-pattern symbol; a new mixer adds its forward FLOPs per token here.
FORWARD_FLOPS_PER_TOKEN = {"*": _attention, "-": _mlp, "M": _mamba2}


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
