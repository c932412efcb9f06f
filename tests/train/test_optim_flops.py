"""Optimizer masks and schedule; FLOP accounting against XLA's own count."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcjax.models.attention import AttentionConfig
from lcjax.models.config import ModelConfig
from lcjax.models.mamba import MambaConfig
from lcjax.models.mlp import MLPConfig
from lcjax.train import flops, optim
from lcjax.train.state import model_skeleton


def _flat(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_decay_mask_exempts_norms_and_embeddings():
  _, params = model_skeleton(ModelConfig(tie_embeddings=False))
  for decay_embeddings in (False, True):
    mask = _flat(optim.decay_mask(params, optim.OptimConfig(decay_embeddings=decay_embeddings)))
    axes = {jax.tree_util.keystr(p): v.get_metadata()["logical_axes"]
            for p, v in jax.tree_util.tree_leaves_with_path(
                params, is_leaf=lambda x: isinstance(x, nnx.Variable))}
    assert mask.keys() == axes.keys()
    for name, decays in mask.items():
      if len(axes[name]) == 1:
        assert not decays, name  # norm scales
      elif tuple(axes[name]) == ("vocab", "embed"):
        assert decays == decay_embeddings, name
      else:
        assert decays, name  # projections and the untied head


def test_schedule_warms_up_then_decays_to_the_floor():
  cfg = optim.OptimConfig(peak_learning_rate=1.0, warmup_steps=10,
                          final_learning_rate_fraction=0.1)
  lr = optim.schedule(cfg, total_steps=100)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(lr(100)), 0.1, rtol=1e-6)
  assert all(float(lr(s)) >= float(lr(s + 1)) for s in range(10, 100))


def _xla_forward_flops(cfg: ModelConfig, seq_len: int) -> float:
  from lcjax.models.lm import LM
  model = LM(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  def forward(params):
    return nnx.merge(graphdef, params)(tokens, tokens + 1, tokens)
  cost = jax.jit(forward).lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["flops"] / seq_len


def test_mlp_flops_match_xla():
  cfg = ModelConfig(pattern="----", d_model=64, mlp=MLPConfig(hidden_dim=256))
  ours = flops.forward_flops_per_token(cfg, 64)
  np.testing.assert_allclose(_xla_forward_flops(cfg, 64), ours, rtol=0.05)


def test_attention_flops_match_xla_up_to_the_causal_half():
  """XLA computes every score of the [seq, seq] matrix; we count the causal half it needs.

  The reference kernel computes that whole matrix in one einsum XLA can count ("auto" is the
  blockwise kernel, whose tiles sit in loops and conds)."""
  att = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, impl="reference")
  cfg = ModelConfig(pattern="**", d_model=64, attention=att)
  seq = 256
  ours = flops.forward_flops_per_token(cfg, seq)
  masked_half = 2 * 2 * att.num_heads * att.head_dim * (seq - (seq + 1) / 2) * 2  # 2 layers
  np.testing.assert_allclose(_xla_forward_flops(cfg, seq), ours + masked_half, rtol=0.08)


def test_mamba2_flops_match_xla_up_to_the_causal_half():
  """XLA computes the full [chunk, chunk] intra-chunk matrices; we count the causal half.

  XLA also counts elementwise work (decay cumsums, exp, norms) that MFU leaves out, so the
  dims are large enough for the matmuls to dominate.
  """
  mamba = MambaConfig(d_state=64, headdim=64, chunk_size=64, ngroups=1)
  cfg = ModelConfig(pattern="MM", d_model=256, mamba=mamba)
  seq = 256
  ours = flops.forward_flops_per_token(cfg, seq)
  q, d_inner = 64, 2 * 256
  masked_half = 2 * (mamba.ngroups * mamba.d_state + d_inner) * (q - (q + 1) / 2) * 2
  np.testing.assert_allclose(_xla_forward_flops(cfg, seq), ours + masked_half, rtol=0.1)


def test_forward_flops_sum_the_registry_by_hand():
  """A small hybrid counted by hand: each mixer's matmuls and the LM head."""
  cfg = ModelConfig(vocab_size=100, d_model=16, pattern="M*-",
                    attention=AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=8),
                    mlp=MLPConfig(hidden_dim=48),
                    mamba=MambaConfig(d_state=4, headdim=8, chunk_size=8, ngroups=1))
  seq = 16
  attention = 2 * (2 * 16 * 2 * 8 + 2 * 16 * 1 * 8) + 2 * 2 * 2 * 8 * (seq + 1) / 2
  mlp = 2 * 3 * 16 * 48
  inner, heads, mean_keys = 32, 4, (8 + 1) / 2  # expand 2, 4 heads of 8, chunks of 8
  mamba = (2 * 16 * (2 * inner + 2 * 4 + heads) + 2 * inner * 16  # projections
           + 2 * (inner + 2 * 4) * 4  # conv (width 4)
           + 2 * 4 * mean_keys + 2 * inner * mean_keys + 2 * 2 * inner * 4)  # SSD
  want = attention + mlp + mamba + 2 * 16 * 100
  np.testing.assert_allclose(flops.forward_flops_per_token(cfg, seq), want, rtol=1e-12)
  np.testing.assert_allclose(flops.train_flops_per_token(cfg, seq), 3 * want, rtol=1e-12)
