"""S²-Attn (LongLoRA's shifted sparse attention) through the shared mask, against LongLoRA's own
roll-based formulation written here in plain jnp.

LongLoRA rolls the shifted half of the heads by -G/2 along the sequence, cuts the row into
groups of G tokens and attends causally inside each group. The roll wraps around: in the shifted
heads, the first G/2 tokens share a group with the last G/2 and see them (LongLoRA's known leak
of future tokens). The mask-based version (`Mask.group`) does not wrap: those G/2 tokens form a
group of their own. Everything else is the same computation.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax.errors import ConfigError
from lcjax.kernels.attention import attention
from lcjax.models.attention import Attention, AttentionConfig, s2_attention
from lcjax.models.config import ModelConfig
from tests.numerics import F32, assert_close, random_qkv


def dense_attention(q, k, v, visible):
  """q, k, v `[batch, seq, heads, d]` (as many kv heads as heads), visible bool `[seq, seq]`."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def longlora_roll(q, k, v, groups):
  """LongLoRA's S²-Attn: roll the second half of the heads by -G/2, causal attention within
  groups of G tokens, roll back."""
  batch, seq, heads, d = q.shape
  size = seq // groups
  k, v = (jnp.repeat(x, heads // x.shape[2], axis=2) for x in (k, v))

  def roll(x, by):
    return x.at[:, :, heads // 2:].set(jnp.roll(x[:, :, heads // 2:], by, axis=1))

  grouped = lambda x: roll(x, -size // 2).reshape(batch * groups, size, heads, d)
  causal = jnp.tril(jnp.ones((size, size), bool))
  out = dense_attention(grouped(q), grouped(k), grouped(v), causal)
  return roll(out.reshape(batch, seq, heads, d), size // 2)


def reference(q, k, v, *, mask):
  return attention(q, k, v, jnp.ones(q.shape[:2], jnp.int32), mask=mask, impl="reference")


s2_reference = jax.jit(functools.partial(s2_attention, reference), static_argnums=(3, 4))


@pytest.mark.parametrize("kv_heads", [2, 3])  # split kv heads; repeated (one shared)
def test_matches_longlora_except_its_wraparound(rng, kv_heads):
  seq, groups, heads = 32, 4, 6 if kv_heads == 3 else 4
  size = seq // groups
  q, k, v = random_qkv(rng, q_seq=seq, heads=heads, kv_heads=kv_heads)
  got = s2_reference(q, k, v, AttentionConfig().mask, groups)
  want = jax.jit(longlora_roll, static_argnums=3)(q, k, v, groups)
  # Everything but the first G/2 tokens of the shifted heads is the same.
  leaky = np.zeros(got.shape, bool)
  leaky[:, :size // 2, heads // 2:] = True
  assert_close(jnp.where(leaky, 0, got), jnp.where(leaky, 0, want), F32, "outside the leak")
  # There the roll saw the row's last G/2 tokens too: exactly that explains the difference.
  i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
  leak = (j <= i) | (j >= seq - size // 2)
  half = lambda x: jnp.repeat(x, heads // x.shape[2], axis=2)[:, :, heads // 2:]
  explained = dense_attention(half(q), half(k), half(v), leak)[:, :size // 2]
  assert_close(want[:, :size // 2, heads // 2:], explained, F32, "the leak")
  assert not np.allclose(got[:, :size // 2, heads // 2:], explained, atol=1e-3)


def test_module_and_inference_config(rng):
  """`Attention` with s2_groups equals s2_attention on its q, k, v; `for_inference` gives full
  attention with the same parameters; prefill and step use the full mask (`Attention.mask`)."""
  cfg = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, s2_groups=4, impl="reference")
  model_cfg = ModelConfig(d_model=16, attention=cfg)
  module = Attention(cfg, model_cfg.wide, rngs=nnx.Rngs(0))
  full = Attention(model_cfg.for_inference().attention, model_cfg.wide, rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.standard_normal((2, 64, 16)), jnp.float32)
  segment_ids = jnp.ones((2, 64), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(64), (2, 64))
  forward = lambda m: jax.jit(lambda x: m(x, segment_ids=segment_ids, positions=positions))(x)
  q, k, v = jax.jit(lambda x, p: module._qkv(x, p, x.shape[1]))(x, positions)
  want = module._out(s2_reference(q, k, v, cfg.mask, 4))
  assert_close(forward(module), want, F32, "S² through the model")
  assert model_cfg.for_inference().attention.s2_groups == 0
  want = module._out(jax.jit(functools.partial(reference, mask=cfg.mask))(q, k, v))
  assert_close(forward(full), want, F32, "full")
  assert module.mask == full.mask and module.mask.group is None


def test_checks():
  with pytest.raises(ConfigError, match="s2_groups=1 needs >= 2"):
    AttentionConfig(s2_groups=1)
  with pytest.raises(ConfigError, match="even num_heads=3"):
    AttentionConfig(num_heads=3, num_kv_heads=1, s2_groups=4)
  q = jnp.zeros((1, 30, 4, 8))
  with pytest.raises(ValueError, match="s2_groups=4 must divide the sequence length 30"):
    s2_attention(reference, q, q, q, AttentionConfig().mask, 4)
