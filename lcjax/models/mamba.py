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

import dataclasses
import math
from typing import NamedTuple

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.config import check_positive, check_types
from lcjax.errors import ConfigError
from lcjax.kernels import ssd as ssd_kernels
from lcjax.kernels.ops import LOCAL
from lcjax.kernels.ssd import ssd, ssd_step
from lcjax.models.layers import ModelWide, normal_param


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MambaConfig:
  """The Mamba-2 mixer ("M"), named and defaulted as mamba_ssm's `Mamba2`.

  d_inner = expand * d_model channels in headdim-wide heads (nheads of them) sharing ngroups
  groups of B/C of width d_state; a depthwise causal conv of width d_conv; the SSD scan in
  chunks of chunk_size. dt is initialised log-uniform in [dt_min, dt_max] (floored at
  dt_init_floor) and clamped to dt_limit after the softplus; A = -a with a ~ U(A_init_range).
  impl: the SSD kernel, by name (`lcjax.kernels.ssd.IMPLS`); "auto" picks the backend's best.
  """
  d_state: int = 128
  d_conv: int = 4
  expand: int = 2
  headdim: int = 64
  ngroups: int = 1
  chunk_size: int = 256
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  dt_limit: tuple[float, float] = (0.0, float("inf"))
  A_init_range: tuple[float, float] = (1.0, 16.0)
  impl: str = "auto"

  def __post_init__(self):
    check_types(self)
    check_positive(self, ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"))
    if not 0 < self.dt_min <= self.dt_max:
      raise ConfigError(
          f"Need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}: fix "
          f"MambaConfig.dt_min / MambaConfig.dt_max.")
    if self.dt_init_floor < 0:
      raise ConfigError(f"MambaConfig.dt_init_floor must be >= 0, got {self.dt_init_floor}.")
    lo, hi = self.dt_limit
    if not 0 <= lo < hi:
      raise ConfigError(f"MambaConfig.dt_limit={self.dt_limit} must be (min, max) with "
                        f"0 <= min < max, e.g. (0.0, float('inf')) for no clamp.")
    lo, hi = self.A_init_range
    if not 0 < lo <= hi:
      raise ConfigError(f"MambaConfig.A_init_range={self.A_init_range} must be (min, max) with "
                        f"0 < min <= max (A = -U(min, max)), e.g. (1.0, 16.0).")
    ssd_kernels.SSD.check_name(self.impl, "MambaConfig.impl")

  def d_inner(self, d_model: int) -> int:
    return self.expand * d_model

  def nheads(self, d_model: int) -> int:
    return self.d_inner(d_model) // self.headdim

  def check_d_model(self, d_model: int) -> None:
    """The constraints between this config and the model's width (only models with Mamba-2
    layers need them)."""
    inner, heads = self.d_inner(d_model), self.nheads(d_model)
    if inner % self.headdim:
      raise ConfigError(
          f"MambaConfig.expand * ModelConfig.d_model = {inner} must be a multiple of "
          f"MambaConfig.headdim={self.headdim}: change MambaConfig.headdim (or "
          f"MambaConfig.expand / ModelConfig.d_model).")
    if heads % self.ngroups:
      raise ConfigError(
          f"The {heads} Mamba-2 heads (MambaConfig.expand * ModelConfig.d_model / "
          f"MambaConfig.headdim) must be a multiple of MambaConfig.ngroups={self.ngroups}: "
          f"change MambaConfig.ngroups to a divisor of {heads}.")


def mamba_flops(cfg: MambaConfig, d_model: int, seq_len: int) -> float:
  """Forward matmul FLOPs per token: projections, the depthwise conv, and the chunked SSD
  (chunk length Q, causal within).

  Per token and head (head_dim P, state N, G groups): intra-chunk C·Bᵀ scores (per group) and
  their weighted sum of x, both over (Q+1)/2 earlier positions on average; the token's
  contribution to its chunk's state (x ⊗ B) and the incoming state's output (C·h), P·N each.
  Inter-chunk state passing is O(P·N) per chunk, negligible per token.
  """
  d, d_inner, heads = d_model, cfg.d_inner(d_model), cfg.nheads(d_model)
  bc = cfg.ngroups * cfg.d_state
  projections = 2 * d * (2 * d_inner + 2 * bc + heads) + 2 * d_inner * d  # in (z,x,B,C,dt), out
  conv = 2 * (d_inner + 2 * bc) * cfg.d_conv
  mean_keys = (min(cfg.chunk_size, seq_len) + 1) / 2
  scores = 2 * cfg.ngroups * cfg.d_state * mean_keys
  mix = 2 * d_inner * mean_keys
  states = 2 * 2 * d_inner * cfg.d_state
  return projections + conv + scores + mix + states


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

  def __init__(self, cfg: MambaConfig, wide: ModelWide, *, rngs: nnx.Rngs, ops=LOCAL):
    d, inner, heads = wide.d_model, cfg.d_inner(wide.d_model), cfg.nheads(wide.d_model)
    bc = cfg.ngroups * cfg.d_state
    width = cfg.d_conv
    self.d_inner, self.nheads, self.headdim = inner, heads, cfg.headdim
    self.ngroups, self.d_state, self.d_conv = cfg.ngroups, cfg.d_state, width
    self.chunk_size = cfg.chunk_size
    self.impl = cfg.impl
    self.ops = ops
    self.dt_limit = tuple(float(v) for v in cfg.dt_limit)
    self.eps = wide.norm_eps
    self.dtype = wide.dtype

    std = wide.init_std
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

    a = _uniform(rngs, (heads,), *cfg.A_init_range)
    self.A_log = nnx.Param(jnp.log(a), logical_axes=("ssm_heads",))
    log_dt = _uniform(rngs, (heads,), math.log(cfg.dt_min), math.log(cfg.dt_max))
    dt = jnp.maximum(jnp.exp(log_dt), cfg.dt_init_floor)
    self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)), logical_axes=("ssm_heads",))
    self.D = nnx.Param(jnp.ones((heads,), jnp.float32), logical_axes=("ssm_heads",))
    self.norm_scale = nnx.Param(jnp.ones((inner,), jnp.float32), logical_axes=("ssm_inner",))
    self.out = normal_param(rngs, (inner, d), wide.output_init_std, ("ssm_inner", "embed"))

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

  def _ssd_inputs(self, u: jax.Array, segment_ids, ops):
    """in_proj and the conv (by `ops`) of u `[batch, seq, embed]` -> z, the SSD's
    (x, dt, A, B, C) and the conv inputs (x, B, C)."""
    batch, seq, _ = u.shape
    z, conv_in, dt_raw = self._in_proj(u)
    weights, biases = self._conv_params()
    x, B, C = (jax.nn.silu(ops.conv(v, w, b, segment_ids, part=part))
               for v, w, b, part in zip(conv_in, weights, biases, CONV_PARTS))
    dt, A = self._dt_A(dt_raw)
    x = x.reshape(batch, seq, self.nheads, self.headdim)
    B = B.reshape(batch, seq, self.ngroups, self.d_state)
    C = C.reshape(batch, seq, self.ngroups, self.d_state)
    return z, (x, dt, A, B, C), conv_in

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """x `[batch, seq, embed]`, segment_ids `[batch, seq]` -> `[batch, seq, embed]`.

    positions are unused (order is carried by the recurrence). The ops run in their Mamba-2
    token order (`to_mamba_layout`), which is the batch's own except under striped sharding.
    """
    del positions
    ops = self.ops
    u, segment_ids = ops.to_mamba_layout(x), ops.to_mamba_layout(segment_ids)
    z, args, _ = self._ssd_inputs(u, segment_ids, ops)
    y = ops.ssd(*args, segment_ids, chunk_size=self.chunk_size, impl=self.impl)
    return ops.from_mamba_layout(self._output(y, args[0], z))

  # --- recurrent decoding ---

  def init_cache(self, batch: int, max_len: int | None = None) -> MambaCache:
    """An empty cache; max_len is accepted (and ignored) for the mixers' common interface."""
    del max_len
    conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
    return MambaCache(
        conv=jnp.zeros((batch, self.d_conv - 1, conv_dim), self.dtype),
        ssm=jnp.zeros((batch, self.nheads, self.headdim, self.d_state), jnp.float32))

  def prefill(self, x: jax.Array, cache: MambaCache | None = None, *,
              segment_ids: jax.Array | None = None,
              positions: jax.Array | None = None) -> tuple[jax.Array, MambaCache]:
    """The forward over a prompt `[batch, k, embed]` (one document per row, on one device)
    and its cache.

    segment_ids `[batch, k]`: None for all ones, else left padding (0) then the prompt (1).
    The conv and the SSD keep documents apart, so the padding reaches neither the prompt's
    outputs nor the final state (`ssd`'s is the last document's); the conv cache holds zeros,
    not padding, in front of a prompt shorter than d_conv - 1. `cache`, if given, must be empty
    (from `init_cache`): prefill starts from zero states.
    """
    del cache, positions
    if segment_ids is None:
      segment_ids = jnp.ones(x.shape[:2], jnp.int32)
    z, args, conv_in = self._ssd_inputs(x, segment_ids, LOCAL)
    y, state = ssd(*args, chunk_size=self.chunk_size, segment_ids=segment_ids, impl=self.impl)
    y = self._output(y, args[0], z)
    real = (segment_ids != 0)[..., None]
    conv_in = jnp.where(real, jnp.concatenate(conv_in, axis=-1), 0)
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
