"""The Mamba-2 mixer against a naive per-token implementation; init; packing; the config."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax.models.attention import AttentionConfig
from lcjax.models.config import ModelConfig
from lcjax.models.lm import LM
from lcjax.models.mamba import Mamba2, MambaConfig
from lcjax.models.mlp import MLPConfig
from lcjax.models.report import counted_params, mixer_params
from tests.numerics import random_segments

# 64 channels in 4 heads of 16, 2 groups of B/C, chunks of 16 (so seq 24 spans two).
CFG = ModelConfig(vocab_size=64, d_model=32, pattern="M",
                  attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8),
                  mlp=MLPConfig(hidden_dim=64),
                  mamba=MambaConfig(d_state=16, headdim=16, ngroups=2, chunk_size=16),
                  init_std=0.1, dtype="float32")


def with_mamba(cfg, **overrides):
  """cfg with its MambaConfig fields (and ModelConfig fields, for d_model, pattern, init_std,
  tie_embeddings) replaced."""
  model = {k: overrides.pop(k) for k in ("d_model", "pattern", "init_std", "tie_embeddings")
           if k in overrides}
  return dataclasses.replace(cfg, mamba=dataclasses.replace(cfg.mamba, **overrides), **model)


def make_mixer(rng, cfg=CFG):
  """A mixer whose D and norm scale are random too (init sets them to 1, hiding misuse)."""
  mixer = Mamba2(cfg.mamba, cfg.wide, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  mixer.D[...] = jnp.asarray(rng.uniform(0.5, 1.5, mixer.D.shape), jnp.float32)
  mixer.norm_scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, mixer.norm_scale.shape), jnp.float32)
  return mixer


def naive_mamba2(p, u, segment_ids, cfg):
  """The whole block one token at a time (a scan), straight from mamba_ssm's Mamba2 recurrence.

  p: the mixer's parameters by name; u `[batch, seq, d_model]`; segment_ids `[batch, seq]`.
  The conv keeps a window of the last d_conv inputs, emptied where a document starts.
  """
  batch, seq, _ = u.shape
  m = cfg.mamba
  inner, heads, hd = m.d_inner(cfg.d_model), m.nheads(cfg.d_model), m.headdim
  groups, n, width = m.ngroups, m.d_state, m.d_conv
  group_of_head = np.arange(heads) // (heads // groups)
  w = jnp.concatenate([p["conv_x"], p["conv_B"], p["conv_C"]], axis=-1)  # [width, channels]
  bias = jnp.concatenate([p["conv_x_bias"], p["conv_B_bias"], p["conv_C_bias"]])
  A = -jnp.exp(p["A_log"])

  def token(carry, inputs):
    state, window, prev_seg = carry
    u_t, seg_t = inputs
    new_doc = (seg_t != prev_seg)
    state = jnp.where(new_doc[:, None, None, None], 0.0, state)
    window = jnp.where(new_doc[:, None, None], 0.0, window)
    xbc = jnp.concatenate([u_t @ p["in_x"], u_t @ p["in_B"], u_t @ p["in_C"]], axis=-1)
    window = jnp.concatenate([window[:, 1:], xbc[:, None]], axis=1)  # oldest first
    conv = jax.nn.silu(jnp.sum(window * w, axis=1) + bias)
    x = conv[:, :inner].reshape(batch, heads, hd)
    B = conv[:, inner:inner + groups * n].reshape(batch, groups, n)[:, group_of_head]
    C = conv[:, inner + groups * n:].reshape(batch, groups, n)[:, group_of_head]
    dt = jnp.clip(jax.nn.softplus(u_t @ p["in_dt"] + p["dt_bias"]), *m.dt_limit)
    decay = jnp.exp(dt * A)[:, :, None, None]
    state = decay * state + dt[:, :, None, None] * x[..., None] * B[:, :, None, :]
    y = jnp.einsum("bhpn,bhn->bhp", state, C) + p["D"][:, None] * x
    y = y.reshape(batch, inner) * jax.nn.silu(u_t @ p["in_z"])
    y = y.reshape(batch, groups, inner // groups)
    y = y / jnp.sqrt(jnp.mean(y * y, axis=-1, keepdims=True) + cfg.norm_eps)
    out = (y.reshape(batch, inner) * p["norm_scale"]) @ p["out"]
    return (state, window, seg_t), out

  carry = (jnp.zeros((batch, heads, hd, n)), jnp.zeros((batch, width, w.shape[1])),
           jnp.full((batch,), -1, jnp.int32))
  _, out = jax.lax.scan(token, carry, (jnp.moveaxis(u, 1, 0), jnp.moveaxis(segment_ids, 1, 0)))
  return jnp.moveaxis(out, 0, 1)


def test_forward_and_grads_match_naive(rng):
  # dt starts in [0.001, 0.1] (then the projection moves it): this limit clamps some of it.
  cfg = with_mamba(CFG, dt_limit=(0.003, 0.05))
  mixer = make_mixer(rng, cfg)
  batch, seq = 2, 24
  u = jnp.asarray(rng.normal(size=(batch, seq, cfg.d_model)), jnp.float32)
  seg = jnp.asarray(random_segments(rng, batch, seq))
  cot = jnp.asarray(rng.normal(size=(batch, seq, cfg.d_model)), jnp.float32)
  graphdef, state = nnx.split(mixer)

  def loss(params, u):
    out = nnx.merge(graphdef, params)(u, segment_ids=seg, positions=None)
    return jnp.sum(out * cot), out

  def naive_loss(params, u):
    out = naive_mamba2(params, u, seg, cfg)
    return jnp.sum(out * cot), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, u)
  pure = nnx.to_pure_dict(state)
  (_, want), want_grads = jax.jit(
      jax.value_and_grad(naive_loss, argnums=(0, 1), has_aux=True))(pure, u)

  np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-4)
  got_grads = (nnx.to_pure_dict(grads[0]), grads[1])
  flat_got = dict(jax.tree_util.tree_leaves_with_path(got_grads))
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want_grads))
  assert flat_got.keys() == flat_want.keys()
  for path, g in flat_got.items():
    w = flat_want[path]
    scale = float(jnp.abs(w).max()) + 1e-6
    np.testing.assert_allclose(g / scale, w / scale, atol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


def test_init_distributions():
  cfg = with_mamba(CFG, d_model=256, headdim=2, ngroups=1, dt_min=0.002, dt_max=0.05,
                   dt_init_floor=1e-3, A_init_range=(2.0, 8.0), init_std=0.02)
  mixer = Mamba2(cfg.mamba, cfg.wide, rngs=nnx.Rngs(0))
  heads = cfg.mamba.nheads(cfg.d_model)
  assert heads == 256
  a = np.exp(np.asarray(mixer.A_log[...]))
  assert a.min() >= 2.0 and a.max() <= 8.0 and a.max() - a.min() > 5.0  # spread over the range
  dt = np.asarray(jax.nn.softplus(mixer.dt_bias[...]))
  np.testing.assert_array_less(0.002 * (1 - 1e-5), dt)
  np.testing.assert_array_less(dt, 0.05 * (1 + 1e-5))
  log_dt = np.log(dt)  # log-uniform: its mean is the middle of [log dt_min, log dt_max]
  assert abs(log_dt.mean() - (math.log(0.002) + math.log(0.05)) / 2) < 0.2
  np.testing.assert_array_equal(mixer.D[...], 1.0)
  np.testing.assert_array_equal(mixer.norm_scale[...], 1.0)
  bound = 1 / math.sqrt(cfg.mamba.d_conv)
  for name in ("conv_x", "conv_B", "conv_C", "conv_x_bias", "conv_B_bias", "conv_C_bias"):
    v = np.asarray(getattr(mixer, name)[...])
    assert np.abs(v).max() <= bound and np.abs(v).max() > 0.8 * bound, name
  for name in ("in_z", "in_x", "in_B", "in_C", "in_dt"):
    assert abs(np.std(getattr(mixer, name)[...]) - 0.02) < 0.002, name
  assert abs(np.std(mixer.out[...]) - cfg.output_init_std) < 0.1 * cfg.output_init_std


def test_dt_init_floor():
  cfg = with_mamba(CFG, dt_min=1e-4, dt_max=1e-3, dt_init_floor=5e-4)
  dt = jax.nn.softplus(Mamba2(cfg.mamba, cfg.wide, rngs=nnx.Rngs(0)).dt_bias[...])
  assert float(dt.min()) >= 5e-4 * (1 - 1e-5)


def test_logical_axes():
  mixer = Mamba2(CFG.mamba, CFG.wide, rngs=nnx.Rngs(0))
  inner, bc, heads = "ssm_inner", "ssm_bc", "ssm_heads"
  want = {
      "in_z": ("embed", inner), "in_x": ("embed", inner), "in_B": ("embed", bc),
      "in_C": ("embed", bc), "in_dt": ("embed", heads), "conv_x": ("conv", inner),
      "conv_B": ("conv", bc), "conv_C": ("conv", bc), "conv_x_bias": (inner,),
      "conv_B_bias": (bc,), "conv_C_bias": (bc,), "A_log": (heads,), "dt_bias": (heads,),
      "D": (heads,), "norm_scale": (inner,), "out": (inner, "embed"),
  }
  state = nnx.state(mixer, nnx.Param)
  assert set(state.keys()) == set(want)
  for name, axes in want.items():
    var = getattr(mixer, name)
    assert var.get_metadata()["logical_axes"] == axes, name
    assert var[...].ndim == len(axes) and var[...].dtype == jnp.float32, name
  m = CFG.mamba
  d, i, g = CFG.d_model, m.d_inner(CFG.d_model), m.ngroups * m.d_state
  assert mixer.in_B.shape == (d, g) and mixer.conv_x.shape == (m.d_conv, i)
  assert mixer.in_dt.shape == (d, m.nheads(d)) and mixer.out.shape == (i, d)


def pack(docs, pad, total):
  """A packed row of `docs` (then `pad` padding tokens), and each doc alone in a row of the same
  length (trailing padding cannot reach it, the model being causal): rows, segment ids, positions.
  """
  lengths = [d.shape[0] for d in docs]
  fill = lambda n: np.zeros((total - n, *docs[0].shape[1:]), docs[0].dtype)
  packed = np.concatenate(docs + [fill(total - pad)])
  rows = [packed] + [np.concatenate([d, fill(len(d))]) for d in docs]
  seg = [np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad)])]
  seg += [np.concatenate([np.ones(n), np.zeros(total - n)]) for n in lengths]
  pos = [np.concatenate([np.arange(n) for n in lengths] + [np.zeros(pad)])]
  pos += [np.concatenate([np.arange(n), np.zeros(total - n)]) for n in lengths]
  as_int = lambda a: jnp.asarray(np.stack(a), jnp.int32)
  return jnp.asarray(np.stack(rows)), as_int(seg), as_int(pos)


def assert_packed_equals_alone(out, lengths):
  start = 0
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(out[0, start:start + n], out[i + 1, :n], atol=1e-5, rtol=1e-5)
    start += n


def test_mixer_packed_row_equals_documents_alone(rng):
  mixer = make_mixer(rng)
  lengths, pad = (5, 1, 7, 2, 3), 3
  docs = [rng.normal(size=(n, CFG.d_model)).astype(np.float32) for n in lengths]
  rows, seg, _ = pack(docs, pad, sum(lengths) + pad)
  out = nnx.jit(lambda m, x, s: m(x, segment_ids=s, positions=None))(mixer, rows, seg)
  assert_packed_equals_alone(out, lengths)


LM_CFG = with_mamba(CFG, pattern="M*M-", ngroups=1, init_std=0.02)


@nnx.jit
def lm_forward(model, inputs, segment_ids, positions):
  return model(inputs, segment_ids, positions)


@pytest.mark.parametrize("position_encoding", ["rope", "none"])
def test_lm_packed_row_equals_documents_alone(rng, position_encoding):
  model = LM(dataclasses.replace(LM_CFG, attention=dataclasses.replace(
      LM_CFG.attention, position_encoding=position_encoding)), rngs=nnx.Rngs(0))
  lengths, pad = (5, 2, 1, 9), 3
  docs = [rng.integers(0, CFG.vocab_size, n).astype(np.int32) for n in lengths]
  assert_packed_equals_alone(lm_forward(model, *pack(docs, pad, sum(lengths) + pad)), lengths)


@pytest.mark.parametrize("overrides", [
    dict(pattern="M"), dict(pattern="M*M-"), dict(pattern="MM", ngroups=2),
    dict(pattern="M-", tie_embeddings=False, expand=3, d_conv=2),
])
def test_num_params_with_mamba(overrides):
  cfg = with_mamba(LM_CFG, **overrides)
  d, vocab, m = 32, 64, cfg.mamba  # d_state 16, headdim 16 (CFG)
  inner = m.expand * d
  heads, bc = inner // 16, 2 * m.ngroups * 16  # B and C
  by_hand = {
      "M": (d * (2 * inner + bc + heads)  # in_proj: z, x, B, C, dt
            + (m.d_conv + 1) * (inner + bc)  # depthwise conv weights and biases over x, B, C
            + 3 * heads + inner + inner * d),  # A_log, dt_bias, D; gated norm; out_proj
      "*": d * (4 + 2 * 2) * 8 + 4 * 8 * d,  # q, k, v (2 kv heads of 8); o
      "-": 3 * d * 64,  # gate, up, down
  }
  total = (vocab * d * (1 if cfg.tie_embeddings else 2)  # embedding (and untied head)
           + sum(d + by_hand[s] for s in cfg.pattern) + d)  # blocks with pre-norms, final norm
  assert {s: mixer_params(cfg, s) for s in set(cfg.pattern)} == {
      s: by_hand[s] for s in set(cfg.pattern)}
  model = LM(cfg, rngs=nnx.Rngs(0))
  assert sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == total


def test_num_params_mamba_ssm_130m():
  # mamba_ssm's Mamba2-130m (vocab 50277 padded to 50288, tied), from its modules' shapes.
  cfg = ModelConfig(vocab_size=50288, d_model=768, pattern="M" * 24, mamba=MambaConfig())
  per_layer = (768 * 3352  # in_proj: 2 * 1536 (z, x) + 2 * 128 (B, C) + 24 (dt) outputs
               + 1792 * 4 + 1792  # conv1d weight [1792, 1, 4] and bias
               + 3 * 24 + 1536  # A_log, D, dt_bias; norm
               + 1536 * 768  # out_proj
               + 768)  # the block's norm
  assert counted_params(cfg) == 50288 * 768 + 24 * per_layer + 768 == 128_989_632


def test_bfloat16_compute_float32_logits(rng):
  inputs = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 24)), jnp.int32)
  data = (inputs, jnp.ones_like(inputs), jnp.broadcast_to(jnp.arange(24), inputs.shape))
  model = LM(dataclasses.replace(LM_CFG, dtype="bfloat16"), rngs=nnx.Rngs(0))
  logits = lm_forward(model, *data)
  assert logits.dtype == jnp.float32 and np.isfinite(logits).all()
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  want = lm_forward(LM(LM_CFG, rngs=nnx.Rngs(0)), *data)
  np.testing.assert_allclose(logits, want, atol=0.05)  # bfloat16 rounding only


@pytest.mark.parametrize("overrides, error, message", [
    (dict(headdim=24), ValueError, "MambaConfig.headdim"),
    (dict(ngroups=3), ValueError, "MambaConfig.ngroups"),
    (dict(d_state=0), ValueError, "MambaConfig.d_state"),
    (dict(chunk_size=0), ValueError, "MambaConfig.chunk_size"),
    (dict(dt_min=0.2), ValueError, "MambaConfig.dt_min"),
    (dict(dt_init_floor=-1.0), ValueError, "MambaConfig.dt_init_floor"),
    (dict(dt_limit=(0.1, 0.01)), ValueError, "MambaConfig.dt_limit"),
    (dict(A_init_range=(0.0, 16.0)), ValueError, "MambaConfig.A_init_range"),
    (dict(dt_limit=(0.0, "inf")), TypeError, "MambaConfig.dt_limit"),
    (dict(A_init_range=(1.0, 2.0, 3.0)), TypeError, "MambaConfig.A_init_range"),
])
def test_config_validation(overrides, error, message):
  with pytest.raises(error, match=message):
    with_mamba(CFG, **overrides)


def test_config_divisibility_only_binds_with_mamba_layers():
  with_mamba(CFG, pattern="*-", headdim=24, ngroups=3)
