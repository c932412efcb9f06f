"""The Mamba-2 mixer ("M" in a layer pattern), with the semantics of mamba_ssm's `Mamba2`.

    z, x, B, C, dt = in_proj(u)                     (no biases)
    x, B, C = silu(causal_depthwise_conv1d(x, B, C))  (width d_conv, with bias)
    dt = clamp(softplus(dt + dt_bias), *dt_limit);  A = -exp(A_log)
    y = ssd(x, dt, A, B, C) + D * x                 (`lcjax.kernels.ssd`)
    out = out_proj(rms_norm_per_group(y * silu(z)) * scale)

Parameters are stored per part rather than fused, so each can be sharded on its own axis:
mamba_ssm's `in_proj.weight` `[2*d_inner + 2*ngroups*d_state + nheads, d_model]` is, split along
its first axis in the order [z, x, B, C, dt] and transposed, `in_z`, `in_x`, `in_B`, `in_C`,
`in_dt`; its depthwise `conv1d.weight` `[conv_dim, 1, d_conv]` is, split along channels in the
order [x, B, C] and transposed to `[d_conv, channels]`, `conv_x`, `conv_B`, `conv_C` (and
`conv1d.bias` likewise `conv_*_bias`); `norm.weight` is `norm_scale`, `out_proj.weight.T` is
`out`. A converter is those splits and transposes: the conv being depthwise, splitting it by
channel is exact. (mamba_ssm's optional `d_mlp` gated-MLP part of in_proj is not supported;
it is 0 in its configs.)

Packed documents: the SSM state is reset where the segment id changes (`ssd`'s segment_ids,
mamba_ssm's seq_idx) and a token's conv window only sees earlier tokens of its own document
(mamba_ssm's causal_conv1d with seq_idx).

Precision: projections and the conv run in the compute dtype (the conv accumulates in float32);
dt, A, the decays and the states are float32; the gated norm computes in float32.

Recurrent decoding: `init_cache`, `prefill` and `step`, the same interface as
`Attention` and `MLP` (see `lcjax.models.lm.LM.decode_step`).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.kernels.conv import causal_conv
from lcjax.kernels.ssd import ssd, ssd_step
from lcjax.models.config import ModelConfig
from lcjax.models.layers import normal_param
from lcjax.parallel.sequence import SequenceSharding

CONV_PARTS = ("x", "B", "C")  # the order of channels in the conv cache, as in mamba_ssm's xBC


class MambaCache(NamedTuple):
  """conv: the last d_conv - 1 conv inputs `[batch, d_conv - 1, d_inner + 2*ngroups*d_state]`
  (channels [x, B, C], compute dtype; zeros before the first token); ssm: the SSD state
  `[batch, heads, head_dim, d_state]` float32."""
  conv: jax.Array
  ssm: jax.Array


def gated_rms_norm(y: jax.Array, z: jax.Array, scale: jax.Array, groups: int,
                   eps: float) -> jax.Array:
  """rms_norm(y * silu(z)) over each of `groups` equal slices of the last axis, times scale.

  mamba_ssm's RMSNormGated(norm_before_gate=False, group_size=d_inner // ngroups). float32
  inside; returns y.dtype.
  """
  h = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
  shape = h.shape
  h = h.reshape(*shape[:-1], groups, shape[-1] // groups)
  h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
  return (h.reshape(shape) * scale).astype(y.dtype)


def _uniform(rngs: nnx.Rngs, shape, low: float, high: float) -> jax.Array:
  return jax.random.uniform(rngs.params(), shape, jnp.float32, low, high)


class Mamba2(nnx.Module):
  """The Mamba-2 block's mixer; `__call__(x, *, segment_ids, positions)` like the others.

  Init, as mamba_ssm: A_log = log(U(A_init_range)); dt = exp(U(log dt_min, log dt_max))
  floored at dt_init_floor, stored as dt_bias = softplus^-1(dt); D = 1; norm scale 1. The
  projections are normal(init_std), out at output_init_std, as in the other mixers (mamba_ssm
  itself leaves nn.Linear's kaiming-uniform init). Conv weights and biases are PyTorch's
  Conv1d default: kaiming_uniform(a=sqrt(5)) with fan_in = d_conv (depthwise) is
  U(-1/sqrt(d_conv), 1/sqrt(d_conv)), and the bias the same bound.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs,
               sequence: SequenceSharding | None = None):
    d, inner, heads = cfg.d_model, cfg.mamba_d_inner, cfg.mamba_nheads
    bc = cfg.mamba_ngroups * cfg.mamba_d_state
    width = cfg.mamba_d_conv
    self.d_inner, self.nheads, self.headdim = inner, heads, cfg.mamba_headdim
    self.ngroups, self.d_state, self.d_conv = cfg.mamba_ngroups, cfg.mamba_d_state, width
    self.chunk_size = cfg.mamba_chunk_size
    self.impl = cfg.ssd_impl
    self.sequence = sequence
    self.dt_limit = tuple(float(v) for v in cfg.mamba_dt_limit)
    self.eps = cfg.norm_eps
    self.dtype = cfg.compute_dtype

    std = cfg.init_std
    self.in_z = normal_param(rngs, (d, inner), std, ("embed", "ssm_inner"))
    self.in_x = normal_param(rngs, (d, inner), std, ("embed", "ssm_inner"))
    self.in_B = normal_param(rngs, (d, bc), std, ("embed", "ssm_bc"))
    self.in_C = normal_param(rngs, (d, bc), std, ("embed", "ssm_bc"))
    self.in_dt = normal_param(rngs, (d, heads), std, ("embed", "ssm_heads"))

    bound = 1 / math.sqrt(width)
    for part, channels, axis in (("x", inner, "ssm_inner"), ("B", bc, "ssm_bc"),
                                 ("C", bc, "ssm_bc")):
      setattr(self, f"conv_{part}", nnx.Param(_uniform(rngs, (width, channels), -bound, bound),
                                              logical_axes=("conv", axis)))
      setattr(self, f"conv_{part}_bias", nnx.Param(_uniform(rngs, (channels,), -bound, bound),
                                                   logical_axes=(axis,)))

    a = _uniform(rngs, (heads,), *cfg.mamba_A_init_range)
    self.A_log = nnx.Param(jnp.log(a), logical_axes=("ssm_heads",))
    log_dt = _uniform(rngs, (heads,), math.log(cfg.mamba_dt_min), math.log(cfg.mamba_dt_max))
    dt = jnp.maximum(jnp.exp(log_dt), cfg.mamba_dt_init_floor)
    self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)), logical_axes=("ssm_heads",))
    self.D = nnx.Param(jnp.ones((heads,), jnp.float32), logical_axes=("ssm_heads",))
    self.norm_scale = nnx.Param(jnp.ones((inner,), jnp.float32), logical_axes=("ssm_inner",))
    self.out = normal_param(rngs, (inner, d), cfg.output_init_std, ("ssm_inner", "embed"))

  # --- pieces shared by the parallel forward and the recurrent step ---

  def _in_proj(self, u: jax.Array):
    """`[..., d_model]` -> z, (x, B, C) (conv inputs), raw dt; in u's dtype."""
    dt = u.dtype
    proj = lambda w: u @ w[...].astype(dt)
    return proj(self.in_z), (proj(self.in_x), proj(self.in_B), proj(self.in_C)), proj(self.in_dt)

  def _conv_params(self):
    weights = [getattr(self, f"conv_{p}")[...] for p in CONV_PARTS]
    biases = [getattr(self, f"conv_{p}_bias")[...] for p in CONV_PARTS]
    return weights, biases

  def _dt_A(self, dt_raw: jax.Array):
    """float32 dt = clamp(softplus(dt + dt_bias), *dt_limit) and A = -exp(A_log)."""
    dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + self.dt_bias[...])
    lo, hi = self.dt_limit
    if (lo, hi) != (0.0, float("inf")):
      dt = jnp.clip(dt, lo, hi)
    return dt, -jnp.exp(self.A_log[...])

  def _output(self, y: jax.Array, x: jax.Array, z: jax.Array) -> jax.Array:
    """y, x `[..., heads, head_dim]` (SSD output and its input), z `[..., d_inner]`."""
    y = y.astype(jnp.float32) + self.D[...][:, None] * x.astype(jnp.float32)
    y = y.reshape(*y.shape[:-2], self.d_inner).astype(x.dtype)
    y = gated_rms_norm(y, z, self.norm_scale[...], self.ngroups, self.eps)
    return y @ self.out[...].astype(y.dtype)

  def _forward(self, u: jax.Array, segment_ids, initial_state=None):
    """Returns the output, the final SSM state and the conv inputs `[batch, seq, conv_dim]`."""
    batch, seq, _ = u.shape
    z, conv_in, dt_raw = self._in_proj(u)
    weights, biases = self._conv_params()
    x, B, C = (jax.nn.silu(self._conv(v, w, b, segment_ids, part))
               for v, w, b, part in zip(conv_in, weights, biases, CONV_PARTS))
    dt, A = self._dt_A(dt_raw)
    x = x.reshape(batch, seq, self.nheads, self.headdim)
    B = B.reshape(batch, seq, self.ngroups, self.d_state)
    C = C.reshape(batch, seq, self.ngroups, self.d_state)
    if self.sequence is None:
      y, state = ssd(x, dt, A, B, C, chunk_size=self.chunk_size, segment_ids=segment_ids,
                     initial_state=initial_state, impl=self.impl)
    else:  # rows split over devices: states cross shards (training only: no state out)
      y, state = self.sequence.ssd(x, dt, A, B, C, segment_ids, chunk_size=self.chunk_size,
                                   impl=self.impl), None
    return self._output(y, x, z), state, jnp.concatenate(conv_in, axis=-1)

  def _conv(self, u, weight, bias, segment_ids, part: str):
    if self.sequence is None:
      return causal_conv(u, weight, bias, segment_ids)
    # x's channels are split with the heads; B and C are shared by them (see the rules).
    channel_axis = self.sequence.ssm_head_axis if part == "x" else None
    return self.sequence.conv(u, weight, bias, segment_ids, channel_axis=channel_axis)

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """x `[batch, seq, embed]`, segment_ids `[batch, seq]` -> `[batch, seq, embed]`.

    positions are unused (order is carried by the recurrence).
    """
    del positions
    if self.sequence is None:
      return self._forward(x, segment_ids)[0]
    to, back = self.sequence.to_mamba_layout, self.sequence.from_mamba_layout
    return back(self._forward(to(x), to(segment_ids))[0])

  # --- recurrent decoding ---

  def init_cache(self, batch: int, max_len: int | None = None) -> MambaCache:
    """An empty cache; max_len is accepted (and ignored) for the mixers' common interface."""
    del max_len
    conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
    return MambaCache(
        conv=jnp.zeros((batch, self.d_conv - 1, conv_dim), self.dtype),
        ssm=jnp.zeros((batch, self.nheads, self.headdim, self.d_state), jnp.float32))

  def prefill(self, x: jax.Array, cache: MambaCache | None = None, *,
              positions: jax.Array | None = None) -> tuple[jax.Array, MambaCache]:
    """The forward over a prompt `[batch, k, embed]` (one document per row) and its cache.

    `cache`, if given, must be empty (from `init_cache`): prefill starts from zero states.
    """
    del cache, positions
    batch, seq, _ = x.shape
    y, state, conv_in = self._forward(x, jnp.ones((batch, seq), jnp.int32))
    keep = self.d_conv - 1
    conv_in = jnp.pad(conv_in, ((0, 0), (keep, 0), (0, 0)))[:, conv_in.shape[1]:]
    return y, MambaCache(conv=conv_in.astype(self.dtype), ssm=state.astype(jnp.float32))

  def step(self, x: jax.Array, cache: MambaCache) -> tuple[jax.Array, MambaCache]:
    """One token `[batch, embed]` -> (`[batch, embed]`, the cache advanced by it)."""
    batch = x.shape[0]
    z, conv_in, dt_raw = self._in_proj(x)
    xbc = jnp.concatenate(conv_in, axis=-1)
    window = jnp.concatenate([cache.conv.astype(x.dtype), xbc[:, None]], axis=1)
    weights, biases = self._conv_params()
    w = jnp.concatenate(weights, axis=-1).astype(x.dtype).astype(jnp.float32)
    b = jnp.concatenate(biases, axis=-1).astype(x.dtype).astype(jnp.float32)
    conv = jnp.einsum("bkc,kc->bc", window.astype(jnp.float32), w) + b
    conv = jax.nn.silu(conv.astype(x.dtype))
    xs, B, C = jnp.split(conv, [self.d_inner, self.d_inner + self.ngroups * self.d_state],
                         axis=-1)
    dt, A = self._dt_A(dt_raw)
    xs = xs.reshape(batch, self.nheads, self.headdim)
    B = B.reshape(batch, self.ngroups, self.d_state)
    C = C.reshape(batch, self.ngroups, self.d_state)
    y, state = ssd_step(cache.ssm, xs, dt, A, B, C)
    return self._output(y, xs, z), MambaCache(conv=window[:, 1:].astype(self.dtype), ssm=state)
