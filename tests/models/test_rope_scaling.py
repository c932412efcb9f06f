"""RoPE scalings, partial rotary and bfloat16 angles against Hugging Face transformers (the
installed release), and LM-Infinite's distance limit against a dense numpy reference."""

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import GPTNeoXConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

from lcjax.errors import ConfigError
from lcjax.models.attention import Attention, AttentionConfig
from lcjax.models.layers import ModelWide
from lcjax.models.rope import angles_of, apply_rope, rope_parameters
from tests.numerics import F32, assert_close

ORIG = "original_max_position_embeddings"
LONG = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 20.0, 24.0, 28.0, 32.0, 40.0, 48.0, 64.0]
SHORT = [1.0, 1.0, 1.05, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.0, 2.0, 2.0]
# (head_dim, theta, partial_rotary_factor, scaling)
CASES = [
    (64, 10000.0, 1.0, None),
    (64, 500000.0, 0.5, None),
    (64, 10000.0, 1.0, {"rope_type": "linear", "factor": 2.0}),
    (32, 1e6, 0.5, {"rope_type": "linear", "factor": 8.0}),
    (64, 10000.0, 1.0, {"rope_type": "dynamic", "factor": 2.0, ORIG: 16}),
    (128, 500000.0, 0.25, {"rope_type": "dynamic", "factor": 4.0, ORIG: 64}),
    (64, 10000.0, 1.0, {"rope_type": "yarn", "factor": 4.0, ORIG: 256}),
    (64, 10000.0, 0.5, {"rope_type": "yarn", "factor": 8.0, ORIG: 64, "beta_fast": 16,
                        "beta_slow": 2, "truncate": False}),
    (128, 10000.0, 1.0, {"rope_type": "yarn", "factor": 40.0, ORIG: 4096, "mscale": 1.0,
                         "mscale_all_dim": 0.5}),
    (64, 1e6, 1.0, {"rope_type": "yarn", "factor": 4.0, ORIG: 32, "attention_factor": 1.3}),
    (128, 500000.0, 1.0, {"rope_type": "llama3", "factor": 8.0, ORIG: 8192,
                          "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    (64, 10000.0, 1.0, {"rope_type": "llama3", "factor": 4.0, ORIG: 64, "low_freq_factor": 2.0,
                        "high_freq_factor": 8.0}),
    (64, 10000.0, 0.5, {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                        ORIG: 16, "factor": 4.0}),
    (32, 10000.0, 1.0, {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                        ORIG: 64, "attention_factor": 1.1}),
]
IDS = [f"{c[3]['rope_type'] if c[3] else 'default'}-{i}" for i, c in enumerate(CASES)]
POSITIONS = np.array([0, 1, 2, 3, 17, 1000, 4095, 65_537, 123_457, 999_999, 1_000_000])


def hf_config(head_dim, theta, partial, scaling):
  """The transformers config with these rope parameters (GPT-NeoX: it applies partial rotary).
  "dynamic" reads its original length from max_position_embeddings there."""
  params = dict(scaling or {"rope_type": "default"}, rope_theta=theta,
                partial_rotary_factor=partial)
  max_len = params.pop(ORIG) if params["rope_type"] == "dynamic" else 1 << 20
  return GPTNeoXConfig(hidden_size=head_dim * 4, num_attention_heads=4,
                       max_position_embeddings=max_len, rope_parameters=params)


def hf_parameters(config, seq_len):
  rope_type = config.rope_parameters["rope_type"]
  if rope_type == "default":
    inv_freq, factor = GPTNeoXRotaryEmbedding.compute_default_rope_parameters(config)
  else:
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)
  return inv_freq.numpy(), factor


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inv_freq_and_attention_factor_match_transformers(case):
  head_dim, theta, partial, scaling = case
  config = hf_config(*case)
  for seq_len in (None, 8, 16, 17, 64, 65, 100_000, 1_000_001):
    want, want_factor = hf_parameters(config, seq_len)
    got, factor = rope_parameters(head_dim, theta, scaling, partial, seq_len)
    assert got.dtype == np.float64 and got.shape == (int(head_dim * partial) // 2,)
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"seq_len={seq_len}")
    assert factor == pytest.approx(float(want_factor), rel=1e-12), seq_len
    # Traced (decoding): float32 jax, the same values.
    traced = jax.jit(lambda n: rope_parameters(head_dim, theta, scaling, partial, n)[0])
    if seq_len is not None:
      np.testing.assert_allclose(traced(jnp.int32(seq_len)), want, rtol=2e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cos_sin_match_transformers_up_to_1m(case):
  """cos and sin (both times the attention factor) at positions 0..1M, at length 1M + 1.

  transformers computes inv_freq in float32 with torch's pow, which is not correctly rounded
  (an ulp off here and there); ours is float64 rounded once. At position p the angles differ
  by p * that difference (~0.015 rad at 1M for an ulp of 0.24), and each side rounds its
  float32 product once (~0.03 rad at 1M: the resolution of a float32 angle there)."""
  head_dim, theta, partial, scaling = case
  rotary = GPTNeoXRotaryEmbedding(hf_config(*case))
  cos, sin = (t[0, :, :t.shape[-1] // 2].numpy().astype(np.float64) for t in rotary(
      torch.zeros(1), torch.as_tensor(POSITIONS)[None]))
  seq_len = int(POSITIONS.max()) + 1
  inv_freq, factor = rope_parameters(head_dim, theta, scaling, partial, seq_len)
  angles = np.asarray(angles_of(jnp.asarray(POSITIONS, jnp.int32)[None], inv_freq)[0])
  d_inv = np.abs(inv_freq.astype(np.float32) - rotary.inv_freq.numpy())  # [pairs]
  # Per angle: the inv_freq difference times the position, plus one rounding of the product.
  tol = factor * (POSITIONS[:, None] * d_inv + np.spacing(angles) + 2e-6)
  assert np.all(np.abs(factor * np.cos(angles) - cos) <= tol)
  assert np.all(np.abs(factor * np.sin(angles) - sin) <= tol)


@pytest.mark.parametrize("case", [CASES[1], CASES[7], CASES[12]], ids=["default", "yarn",
                                                                        "longrope"])
def test_partial_rotary_matches_gpt_neox(rng, case):
  """The first rotary_dim features rotate as GPT-NeoX's apply_rotary_pos_emb does, the rest pass
  through untouched."""
  head_dim, theta, partial, scaling = case
  rotary = GPTNeoXRotaryEmbedding(hf_config(*case))
  positions = np.arange(32)[None]
  x = rng.standard_normal((1, 32, 3, head_dim)).astype(np.float32)
  cos, sin = rotary(torch.zeros(1), torch.as_tensor(positions))
  want, _ = apply_rotary_pos_emb(torch.as_tensor(x), torch.as_tensor(x), cos, sin,
                                 unsqueeze_dim=2)
  got = apply_rope(jnp.asarray(x), jnp.asarray(positions, jnp.int32), theta, scaling=scaling,
                   partial_rotary_factor=partial, seq_len=32)
  assert_close(got, want.numpy(), F32, "partial rotary")
  rotary_dim = int(head_dim * partial)
  np.testing.assert_array_equal(got[..., rotary_dim:], x[..., rotary_dim:])


def test_dynamic_ntk_grows_and_resets_as_transformers():
  """transformers' dynamic_rope_update, length after length on one module: it recomputes
  inv_freq when the length grows past the cached one and resets below the original length.
  lcjax is stateless (inv_freq of the current length): the same at every length here. They
  differ only after a longer call when the length shrinks but stays >= the original one
  (transformers keeps the longer call's inv_freq)."""
  case = (64, 10000.0, 1.0, {"rope_type": "dynamic", "factor": 2.0, ORIG: 16})
  rotary = GPTNeoXRotaryEmbedding(hf_config(*case))
  for length in (4, 16, 17, 40, 1000, 10, 16, 50, 3000):
    positions = torch.arange(length)[None]
    cos, _ = rotary(torch.zeros(1), positions)
    inv_freq, _ = rope_parameters(64, 10000.0, case[3], 1.0, length)
    np.testing.assert_allclose(inv_freq, rotary.inv_freq.numpy(), rtol=1e-6, err_msg=length)
    angles = angles_of(jnp.asarray(positions.numpy(), jnp.int32), inv_freq)
    np.testing.assert_allclose(np.cos(angles[0]), cos[0, :, :32].numpy(), atol=1e-4)


def _rotate_np(x, position, inv_freq, factor):
  """Rotate-half RoPE of x `[..., head_dim]` at one position, float64."""
  half = len(inv_freq)
  angle = position * inv_freq
  x1, x2 = x[..., :half], x[..., half:2 * half]
  return factor * np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                                  x2 * np.cos(angle) + x1 * np.sin(angle)], axis=-1)


def _mixer_and_inputs(rng, cfg, seq):
  wide = ModelWide(d_model=16, init_std=0.3, output_init_std=0.3, dtype=jnp.float32,
                   norm_eps=1e-5)
  mixer = Attention(cfg, wide, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  x = rng.standard_normal((1, seq, 16)).astype(np.float32)
  proj = lambda w: np.einsum("bsd,dhk->bshk", x, np.asarray(w[...], np.float64))[0]
  return mixer, x, proj(mixer.q), proj(mixer.k), proj(mixer.v), np.asarray(mixer.o[...])


def _decode(mixer, x, prompt):
  """Outputs `[seq, embed]` of prefill(prompt) then one step per remaining token."""
  y, cache = mixer.prefill(jnp.asarray(x[:, :prompt]), mixer.init_cache(1, x.shape[1]))
  out = [y[0]]
  for t in range(prompt, x.shape[1]):
    y, cache = mixer.step(jnp.asarray(x[:, t]), cache)
    out.append(y)
  return np.concatenate(out)


def _dense(q, k, v, o, score_pair, group):
  """Causal softmax attention with scores from score_pair(t, j, head) -> `[seq, embed]`."""
  seq, heads, head_dim = q.shape
  out = np.zeros((seq, heads, head_dim))
  for t in range(seq):
    for h in range(heads):
      s = np.array([score_pair(t, j, h) for j in range(t + 1)]) / np.sqrt(head_dim)
      p = np.where(np.isfinite(s), np.exp(s - s[np.isfinite(s)].max()), 0.0)
      out[t, h] = (p / p.sum()) @ v[:t + 1, h // group]
  return np.einsum("shk,hkd->sd", out, o)


def test_dynamic_decoding_rotates_as_transformers_generate(rng):
  """Dynamic NTK while decoding: the prompt's keys rotate at the prompt length, each new token's
  q and k at the length seen so far, and the cache keeps every key as it was written."""
  scaling = {"rope_type": "dynamic", "factor": 2.0, ORIG: 4}
  cfg = AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=8, rope_scaling=scaling)
  prompt, seq = 6, 11
  mixer, x, q, k, v, o = _mixer_and_inputs(rng, cfg, seq)
  inv = lambda n: rope_parameters(8, cfg.rope_theta, scaling, 1.0, n)[0]
  length_at = lambda t: max(prompt, t + 1)  # the length when slot t was written / queried

  def score(t, j, h):
    return (_rotate_np(q[t, h], t, inv(length_at(t)), 1.0)
            @ _rotate_np(k[j, 0], j, inv(length_at(j)), 1.0))

  assert_close(_decode(mixer, x, prompt), _dense(q, k, v, o, score, 2), F32, "dynamic")


@pytest.mark.parametrize("window, sinks, max_distance", [(3, 2, 2), (3, 2, 6), (4, 1, 4)])
def test_lm_infinite_distance_limit_matches_dense(rng, window, sinks, max_distance):
  """LM-Infinite (Glaciohound/LM-Infinite: the global branch scores the unrotated key with the
  query rotated to the limit distance): a sink beyond the window is seen at distance
  min(distance, max_distance); keys in the window at their true distance."""
  scaling = {"rope_type": "yarn", "factor": 2.0, ORIG: 8}
  cfg = AttentionConfig(num_heads=2, num_kv_heads=2, head_dim=8, window=window, sinks=sinks,
                        max_distance=max_distance, rope_scaling=scaling)
  mixer, x, q, k, v, o = _mixer_and_inputs(rng, cfg, seq=12)
  inv, factor = rope_parameters(8, cfg.rope_theta, scaling, 1.0, None)

  def score(t, j, h):
    if t - j < window:
      distance = t - j
    elif j < sinks:
      distance = min(t - j, max_distance)
    else:
      return -np.inf
    return _rotate_np(q[t, h], j + distance, inv, factor) @ _rotate_np(k[j, h], j, inv, factor)

  want = _dense(q, k, v, o, score, 1)
  assert_close(_decode(mixer, x, 5), want, F32, "LM-Infinite")
  jitted_step = nnx.jit(lambda m, x, c: m.step(x, c))
  _, cache = mixer.prefill(jnp.asarray(x[:, :11]), mixer.init_cache(1, 12))
  y, _ = jitted_step(mixer, jnp.asarray(x[:, 11]), cache)
  assert_close(y[0], want[11], F32, "LM-Infinite, jitted step")


def test_bfloat16_angles_lose_precision_at_large_positions():
  inv_freq, _ = rope_parameters(64, 10000.0)
  positions = jnp.asarray([[0, 1, 100, 4093, 65_537, 100_003]], jnp.int32)
  exact = np.asarray(positions, np.float64)[..., None] * inv_freq
  f32 = np.asarray(angles_of(positions, inv_freq))
  bf16 = np.asarray(angles_of(positions, inv_freq, "bfloat16"))
  assert bf16.dtype == np.float32
  np.testing.assert_allclose(f32, exact, rtol=2 ** -23, atol=0)
  # Three bfloat16 roundings (position, inv_freq, product): <= ~3 * 2**-9 relative.
  err = np.abs(bf16 - exact)
  assert np.all(err <= 3 * 2 ** -9 * exact + 1e-30)
  assert err[0, :2].max() < 1e-2  # positions 0 and 1: only inv_freq rounds
  assert err[0, -1].max() > 10  # at 1e5 the angle is off by radians: the position is lost
  assert AttentionConfig().rope_dtype == "float32"


@pytest.mark.parametrize("kwargs, match", [
    (dict(rope_scaling={"rope_type": "ntk"}), "rope_type.*one of"),
    (dict(rope_scaling={"factor": 2.0}), "rope_type"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "misses.*original_max_pos"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "beta_fast": 3}),
     "'beta_fast'.*allowed keys"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}),
     "AttentionConfig.rope_theta"),
    (dict(rope_scaling={"rope_type": "linear", "factor": -1.0}), "factor.*> 0"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0],
                        ORIG: 8, "factor": 2.0}), "short_factor.*16 positive"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, ORIG: 64, "low_freq_factor": 4.0,
                        "high_freq_factor": 1.0}), "high_freq_factor"),
    (dict(partial_rotary_factor=0.0), r"partial_rotary_factor=0.0 must be in \(0, 1\]"),
    (dict(partial_rotary_factor=1.5), r"partial_rotary_factor=1.5 must be in \(0, 1\]"),
    (dict(head_dim=12, partial_rotary_factor=0.25), "rotates 3 features.*even"),
    (dict(head_dim=33), "AttentionConfig.head_dim"),
    (dict(rope_dtype="float16"), "rope_dtype"),
    (dict(max_distance=8), "max_distance.*window"),
    (dict(max_distance=8, window=4), "max_distance.*sinks"),
    (dict(position_encoding="none", rope_scaling={"rope_type": "linear", "factor": 2.0}),
     "rope_scaling.*needs position_encoding='rope'"),
])
def test_config_errors(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    AttentionConfig(**{"head_dim": 32, **kwargs})


GIN_EXAMPLES = {
    "linear": '{"rope_type": "linear", "factor": 4.0}',
    "dynamic": '{"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 256}',
    "yarn": '{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}',
    "llama3": ('{"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 256, '
               '"low_freq_factor": 1.0, "high_freq_factor": 4.0}'),
    "longrope": ('{"rope_type": "longrope", "original_max_position_embeddings": 256, '
                 '"factor": 4.0, "short_factor": [1.0, 1.0, 1.0, 1.0, 1.1, 1.2, 1.5, 2.0], '
                 '"long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0]}'),
}


@pytest.mark.parametrize("rope_type", sorted(GIN_EXAMPLES))
def test_gin_bindings_build_the_config(rope_type):
  """One example per method (head_dim 32, half of it rotating: 8 pairs)."""
  gin.clear_config()
  try:
    gin.parse_config([f"AttentionConfig.rope_scaling = {GIN_EXAMPLES[rope_type]}",
                      "AttentionConfig.partial_rotary_factor = 0.5",
                      "AttentionConfig.rope_theta = 500000.0"])
    cfg = AttentionConfig()
  finally:
    gin.clear_config()
  assert cfg.rope_scaling["rope_type"] == rope_type and cfg.partial_rotary_factor == 0.5
  assert hash(cfg) == hash(AttentionConfig(**vars(cfg)))  # hashable, as the other configs
  assert rope_parameters(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, 0.5)[0].shape == (8,)
