"""Recurrent decoding: prefill of k tokens then decode steps reproduce the full forward."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax.models.attention import KVCache
from lcjax.models.config import ModelConfig
from lcjax.models.lm import LM
from lcjax.models.mamba import MambaCache

# d_conv 4 and chunks of 16: k = 1 and 2 are shorter than the conv window (d_conv - 1 = 3),
# k = 21 is not a multiple of the chunk and spans two.
CFG = ModelConfig(vocab_size=64, d_model=32, pattern="M-M-", num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64, mamba_d_state=16, mamba_headdim=16, mamba_ngroups=2,
                  mamba_chunk_size=16, init_std=0.1, dtype="float32")
SEQ = 24


@nnx.jit
def forward(model, tokens):
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return model(tokens, jnp.ones_like(tokens), positions)


@nnx.jit(static_argnums=2)
def prefill(model, tokens, max_len):
  return model.prefill(tokens, model.init_cache(tokens.shape[0], max_len))


@nnx.jit
def decode_step(model, token, cache):
  return model.decode_step(token, cache)


def decode(model, tokens, k):
  """Logits for every position of `tokens`: the first k from prefill, the rest one by one."""
  logits, cache = prefill(model, tokens[:, :k], tokens.shape[1])
  out = [logits]
  for t in range(k, tokens.shape[1]):
    step_logits, cache = decode_step(model, tokens[:, t], cache)
    out.append(step_logits[:, None])
  return jnp.concatenate(out, axis=1), cache


@pytest.mark.parametrize("pattern, position_encoding, window, sinks", [
    ("M-M-", "rope", None, 0), ("M*M-", "rope", None, 0), ("M*M-", "none", None, 0),
    ("*-*-", "rope", 5, 2)])
def test_prefill_then_steps_match_forward(rng, pattern, position_encoding, window, sinks):
  cfg = dataclasses.replace(CFG, pattern=pattern, position_encoding=position_encoding,
                            attention_window=window, attention_sinks=sinks)
  model = LM(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, SEQ)), jnp.int32)
  want = forward(model, tokens)
  assert want.dtype == jnp.float32
  scale = float(jnp.abs(want).max())
  for k in (1, 2, 21):
    got, _ = decode(model, tokens, k)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(got / scale, want / scale, atol=2e-6, err_msg=f"k={k}")


def test_cache_structure():
  cfg = dataclasses.replace(CFG, pattern="M*M-")
  model = LM(cfg, rngs=nnx.Rngs(0))
  mamba, kv, _, mlp = model.init_cache(3, 10)
  conv_dim = cfg.mamba_d_inner + 2 * cfg.mamba_ngroups * cfg.mamba_d_state
  assert isinstance(mamba, MambaCache) and mamba.conv.shape == (3, cfg.mamba_d_conv - 1, conv_dim)
  assert mamba.ssm.shape == (3, cfg.mamba_nheads, cfg.mamba_headdim, cfg.mamba_d_state)
  assert mamba.ssm.dtype == jnp.float32
  assert isinstance(kv, KVCache) and kv.k.shape == (3, 10, cfg.num_kv_heads, cfg.head_dim)
  assert mlp is None

  # Prefill of a prompt shorter than the conv window: the window is zero-padded in front.
  tokens = jnp.asarray([[3, 5], [7, 1]], jnp.int32)
  _, (mamba, kv, _, _) = prefill(model, tokens, SEQ)  # compiled by the test above
  assert mamba.conv.shape == (2, cfg.mamba_d_conv - 1, conv_dim)
  np.testing.assert_array_equal(mamba.conv[:, :-2], 0.0)
  assert np.abs(mamba.conv[:, -2:]).max() > 0
  assert int(kv.index) == 2
  np.testing.assert_array_equal(kv.k[:, 2:], 0.0)


def test_bfloat16_decoding_float32_logits(rng):
  cfg = dataclasses.replace(CFG, pattern="M*M-", dtype="bfloat16")
  model = LM(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
  got, cache = decode(model, tokens, 5)
  assert got.dtype == jnp.float32 and np.isfinite(got).all()
  assert cache[0].ssm.dtype == jnp.float32 and cache[0].conv.dtype == jnp.bfloat16
  assert cache[1].k.dtype == jnp.bfloat16
  want = forward(model, tokens)
  np.testing.assert_allclose(got, want, atol=0.05 * float(jnp.abs(want).max()))
