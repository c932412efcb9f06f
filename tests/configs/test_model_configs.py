"""Every model config in configs/models parses, validates and has the parameters we expect."""

import glob
import os

import pytest

from lcjax.models.allocation import hybrid_pattern
from lcjax.models.pattern import parse_pattern
from lcjax.models.report import counted_params, mixer_params, model_config
from tests.train.runs import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "models", "*.gin")))
NVIDIA_8B = "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"


def registry_count(cfg) -> int:
  """Parameters from the registry's mixers, one per block, plus what LM adds around them."""
  d = cfg.d_model
  per_mixer = {s: mixer_params(cfg, s) for s in set(cfg.pattern)}
  blocks = sum(d + per_mixer[s] for s in cfg.pattern)  # + each block's pre-norm
  return cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + blocks + d  # + final norm


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_counts_match_the_module_tree(path):
  cfg = model_config(path)
  assert counted_params(cfg) == registry_count(cfg)


def test_the_family_is_complete():
  names = {os.path.basename(p)[:-4] for p in CONFIGS}
  for arch in ("transformer", "mamba2", "hybrid"):
    for size in ("tiny", "125m", "350m"):
      assert f"{arch}_{size}" in names
  assert "hybrid_8b" in names


def test_nvidia_8b_pattern_counts_and_allocation():
  symbols = parse_pattern(NVIDIA_8B)
  assert (symbols.count("M"), symbols.count("*"), symbols.count("-")) == (24, 4, 28)
  # Megatron's allocation from ratios reproduces the published pattern exactly.
  assert hybrid_pattern(num_layers=56, attention_ratio=4 / 56, mlp_ratio=0.5) == NVIDIA_8B


def test_hybrid_allocation_spaces_layers_evenly():
  p = hybrid_pattern(num_layers=48, attention_ratio=4 / 48, mlp_ratio=0.5)
  assert (p.count("M"), p.count("*"), p.count("-")) == (20, 4, 24)
  gaps = [len(run) for run in p.replace("-", "").split("*")]  # Mamba runs around attention
  assert max(gaps) - min(gaps) <= 1
  assert hybrid_pattern(10, 0.0, 0.0) == "M" * 10
  assert hybrid_pattern(4, 0.0, 1.0) == "----"
  with pytest.raises(ValueError, match="attention_ratio \\+ mlp_ratio <= 1"):
    hybrid_pattern(8, 0.6, 0.6)


def test_8b_parameter_count_by_hand():
  cfg = model_config(os.path.join(REPO, "configs", "models", "hybrid_8b.gin"))
  assert cfg.pattern == NVIDIA_8B
  d, vocab = 4096, 256_000
  embeddings = 2 * vocab * d                      # untied input table and LM head
  norms = 56 * d + d                              # one pre-norm per block, the final norm
  attention = d * 32 * 128 + 2 * d * 8 * 128 + 32 * 128 * d   # q, k and v (8 groups), o
  mlp = 3 * d * 10944                             # SwiGLU gate, up, down
  d_inner, heads, bc = 2 * d, 2 * d // 64, 8 * 128  # expand 2, headdim 64, 8 groups x d_state
  mamba = (2 * d * d_inner + 2 * d * bc + d * heads  # z, x, B, C, dt projections
           + 4 * (d_inner + 2 * bc) + (d_inner + 2 * bc)  # depthwise conv weights and biases
           + 3 * heads                            # A_log, dt_bias, D
           + d_inner                              # gated RMSNorm scale
           + d_inner * d)                         # out projection
  by_hand = embeddings + norms + 4 * attention + 28 * mlp + 24 * mamba
  assert by_hand == 8_661_857_280
  assert registry_count(cfg) == by_hand
  assert mixer_params(cfg, "M") == mamba and mixer_params(cfg, "*") == attention
  assert counted_params(cfg) == by_hand
