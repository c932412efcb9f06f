"""Recurrent decoding: prefill of k tokens then decode steps reproduce the full forward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax.kernels import ops
from lcjax.models.attention import Attention, AttentionConfig, KVCache
from lcjax.models.config import ModelConfig
from lcjax.models.lm import LM
from lcjax.models.mamba import MambaCache, MambaConfig
from lcjax.models.mlp import MLPConfig
from tests.numerics import F32, assert_close

# d_conv 4 and chunks of 16: k = 1 and 2 are shorter than the conv window (d_conv - 1 = 3),
# k = 21 is not a multiple of the chunk and spans two.
CFG = ModelConfig(vocab_size=64, d_model=32, pattern="M-M-",
                  attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8),
                  mlp=MLPConfig(hidden_dim=64),
                  mamba=MambaConfig(d_state=16, headdim=16, ngroups=2, chunk_size=16),
                  init_std=0.1, dtype="float32")
SEQ = 24


@nnx.jit
def forward(model, tokens):
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return model(tokens, jnp.ones_like(tokens), positions)


@nnx.jit(static_argnums=2)
def prefill(model, tokens, max_len, lengths=None):
  return model.prefill(tokens, model.init_cache(tokens.shape[0], max_len), lengths)


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


@pytest.mark.parametrize("pattern, position_encoding, window, sinks, bias", [
    ("M-M-", "rope", None, 0, "none"), ("M*M-", "rope", None, 0, "none"),
    ("M*M-", "none", None, 0, "none"), ("*-*-", "rope", 5, 2, "none"),
    ("*-*-", "rope", None, 0, "qkvo")])
def test_prefill_then_steps_match_forward(rng, pattern, position_encoding, window, sinks, bias):
  cfg = dataclasses.replace(CFG, pattern=pattern, attention=dataclasses.replace(
      CFG.attention, position_encoding=position_encoding, window=window, sinks=sinks,
      bias=bias))
  model = LM(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  if bias != "none":  # zero at init: make them matter
    for block in model.blocks:
      for name in ("q_bias", "k_bias", "v_bias", "o_bias"):
        param = getattr(block.mixer, name, None)
        if param is not None:
          param[...] = jnp.asarray(rng.normal(0, 0.5, param.shape), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, SEQ)), jnp.int32)
  want = forward(model, tokens)
  assert want.dtype == jnp.float32
  scale = float(jnp.abs(want).max())
  for k in (1, 2, 21):
    got, _ = decode(model, tokens, k)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(got / scale, want / scale, atol=2e-6, err_msg=f"k={k}")


@pytest.mark.parametrize("window, sinks", [(None, 0), (5, 2)])
def test_left_padded_prompts_match_each_prompt_alone(rng, window, sinks):
  """Prompts of lengths 1..k left-padded into one prefill (junk in the pad slots), then each
  row's own continuation decoded: every real position's logits are those of the row's
  unpadded forward, and the caches hold nothing of the pads."""
  cfg = dataclasses.replace(CFG, pattern="M*M-", attention=dataclasses.replace(
      CFG.attention, window=window, sinks=sinks))
  model = LM(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  lengths, k, steps = np.array([1, 2, 9, 12], np.int32), 12, 5
  rows = rng.integers(0, cfg.vocab_size, (len(lengths), k + steps)).astype(np.int32)
  want = forward(model, jnp.asarray(rows))  # causal: what follows a row's real tokens is unseen
  tokens = rng.integers(0, cfg.vocab_size, (len(lengths), k)).astype(np.int32)
  for i, n in enumerate(lengths):
    tokens[i, k - n:] = rows[i, :n]
  logits, cache = prefill(model, jnp.asarray(tokens), k + steps, jnp.asarray(lengths))
  for i, n in enumerate(lengths):
    assert_close(logits[i, k - n:], want[i, :n], F32, f"prefill, row {i} (length {n})")
  mamba, kv = cache[0], cache[1]
  np.testing.assert_array_equal(kv.start, k - lengths)
  np.testing.assert_array_equal(mamba.conv[0, :-1], 0.0)  # length 1 < d_conv - 1
  for t in range(steps):
    step_logits, cache = decode_step(model, jnp.asarray(rows[np.arange(len(lengths)),
                                                             lengths + t]), cache)
    for i, n in enumerate(lengths):
      assert_close(step_logits[i], want[i, n + t], F32, f"step {t}, row {i} (length {n})")


def test_cache_structure():
  cfg = dataclasses.replace(CFG, pattern="M*M-")
  model = LM(cfg, rngs=nnx.Rngs(0))
  mamba, kv, _, mlp = model.init_cache(3, 10)
  m, d = cfg.mamba, cfg.d_model
  conv_dim = m.d_inner(d) + 2 * m.ngroups * m.d_state
  assert isinstance(mamba, MambaCache) and mamba.conv.shape == (3, m.d_conv - 1, conv_dim)
  assert mamba.ssm.shape == (3, m.nheads(d), m.headdim, m.d_state)
  assert mamba.ssm.dtype == jnp.float32
  kv_shape = (3, 10, cfg.attention.num_kv_heads, cfg.attention.head_dim)
  assert isinstance(kv, KVCache) and kv.k.shape == kv_shape
  assert mlp is None

  # Prefill of a prompt shorter than the conv window: the window is zero-padded in front.
  tokens = jnp.asarray([[3, 5], [7, 1]], jnp.int32)
  _, (mamba, kv, _, _) = prefill(model, tokens, SEQ)  # compiled by the test above
  assert mamba.conv.shape == (2, m.d_conv - 1, conv_dim)
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


def _attention_at_capacity(max_len=4):
  """An attention mixer and its cache, filled to max_len by prefill."""
  mixer = Attention(CFG.attention, CFG.wide, rngs=nnx.Rngs(0))
  x = jnp.ones((2, max_len, CFG.d_model), jnp.float32)
  _, cache = mixer.prefill(x, mixer.init_cache(2, max_len))
  return mixer, cache


def test_step_past_max_len_fails():
  mixer, cache = _attention_at_capacity()
  with pytest.raises(ValueError, match="max_len=4"):
    mixer.step(jnp.ones((2, CFG.d_model)), cache)
  with pytest.raises(ValueError, match="max_len=3"):
    mixer.prefill(jnp.ones((2, 4, CFG.d_model)), mixer.init_cache(2, 3))


def test_jitted_step_past_max_len_fails_when_run():
  mixer, cache = _attention_at_capacity()
  step = nnx.jit(lambda m, x, c: m.step(x, c))
  x = jnp.ones((2, CFG.d_model))
  _, room = mixer.prefill(jnp.ones((2, 3, CFG.d_model)), mixer.init_cache(2, 4))
  y, _ = step(mixer, x, room)  # the last slot: fine
  assert np.isfinite(np.asarray(y)).all()
  with pytest.raises(Exception, match="max_len=4"):
    jax.block_until_ready(step(mixer, x, cache))


def test_prefill_uses_the_configured_kernel_and_tiles(monkeypatch):
  seen = []
  real = ops.attention
  monkeypatch.setattr(ops, "attention", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
  cfg = dataclasses.replace(CFG.attention, impl="blockwise", block_q=8, block_kv=16)
  mixer = Attention(cfg, CFG.wide, rngs=nnx.Rngs(0))
  mixer.prefill(jnp.ones((1, 5, CFG.d_model)), mixer.init_cache(1, 8))
  assert [(kw["impl"], kw["block_q"], kw["block_kv"]) for kw in seen] == [("blockwise", 8, 16)]


_ORIG = "original_max_position_embeddings"


@pytest.mark.parametrize("scaling, partial", [
    ({"rope_type": "linear", "factor": 2.0}, 1.0),
    ({"rope_type": "dynamic", "factor": 2.0, _ORIG: 16}, 1.0),  # growth: test_rope_scaling
    ({"rope_type": "yarn", "factor": 4.0, _ORIG: 4}, 0.5),
    ({"rope_type": "llama3", "factor": 4.0, _ORIG: 64, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0}, 1.0),
    # Prompt and row both longer than the original 4: the long factors throughout.
    ({"rope_type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 5.0], _ORIG: 4,
      "factor": 4.0}, 0.5),
])
def test_greedy_decoding_with_rope_scaling_matches_forward(rng, scaling, partial):
  """Prefill a prompt, then feed back each step's argmax: the tokens are the full forward's
  argmax over the decoded row, and the logits its logits."""
  cfg = dataclasses.replace(CFG, pattern="*-", attention=dataclasses.replace(
      CFG.attention, rope_scaling=scaling, partial_rotary_factor=partial))
  model = LM(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  prompt, steps = 8, 4
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, prompt)), jnp.int32)
  logits, cache = prefill(model, tokens, prompt + steps)
  got = [logits[:, -1]]
  for _ in range(steps - 1):
    tokens = jnp.concatenate([tokens, jnp.argmax(got[-1], axis=-1)[:, None]], axis=1)
    step_logits, cache = decode_step(model, tokens[:, -1], cache)
    got.append(step_logits)
  want = forward(model, tokens)[:, prompt - 1:]
  assert_close(jnp.stack(got, axis=1), want, F32, scaling["rope_type"])
  np.testing.assert_array_equal(jnp.argmax(jnp.stack(got, axis=1), -1), jnp.argmax(want, -1))


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_bucket_padding_does_not_change_length_dependent_rope(rng, rope_type):
  """Dynamic NTK and LongRoPE read the length, as transformers does: the largest real position
  + 1, never the padded bucket. Prompts of 6 tokens left-padded to 11 decode as unpadded."""
  half = CFG.attention.head_dim // 2
  scaling = {"dynamic": {"rope_type": "dynamic", "factor": 2.0,
                         "original_max_position_embeddings": 4},
             "longrope": {"rope_type": "longrope", "factor": 4.0,
                          "original_max_position_embeddings": 7,
                          "short_factor": [1.0] * half,
                          "long_factor": [1.0 + i for i in range(half)]}}[rope_type]
  cfg = dataclasses.replace(CFG, pattern="*-*-", attention=dataclasses.replace(
      CFG.attention, rope_scaling=scaling))
  model = LM(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
  k, pad = 6, 5
  want, _ = decode(model, tokens, k)
  padded = jnp.concatenate([jnp.zeros((2, pad), jnp.int32), tokens[:, :k]], axis=1)
  lengths = jnp.full((2,), k, jnp.int32)
  logits, cache = prefill(model, padded, pad + tokens.shape[1], lengths)
  got = [logits[:, pad:]]
  for t in range(k, tokens.shape[1]):
    step_logits, cache = decode_step(model, tokens[:, t], cache)
    got.append(step_logits[:, None])
  assert_close(jnp.concatenate(got, axis=1), want, F32, rope_type)
