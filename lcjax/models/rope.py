"""Rotary position embeddings (RoPE) as pure functions.

Rotate-half convention (GPT-NeoX / Llama in Hugging Face): the feature pairs rotated together
are (i, i + rotary_dim/2), not adjacent features (i, i+1) as in the original RoFormer/GPT-J.
With partial_rotary_factor < 1 only the first rotary_dim = int(head_dim * factor) features
rotate (GPT-NeoX, Phi, StableLM); the rest pass through unchanged.

Positions always come from the batch, `[batch, seq]` int32, so they restart at 0 for every
packed document; never from an arange over the row.

Scalings (`lcjax.models.rope_scaling`: PI, dynamic NTK, YaRN, Llama-3, LongRoPE) rewrite the
inverse frequencies and give an attention factor; as in transformers, cos and sin are both
multiplied by it, so q.k scales by its square.
"""

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.errors import ConfigError
from lcjax.models.rope_scaling import INV_FREQ, check_scaling

ANGLE_DTYPES = ("float32", "bfloat16")


def rotary_dim(head_dim: int, partial_rotary_factor: float = 1.0) -> int:
  """The number of features that rotate (transformers: int(head_dim * factor))."""
  return int(head_dim * partial_rotary_factor)


def check_rope(head_dim: int, scaling: dict | None = None,
               partial_rotary_factor: float = 1.0) -> None:
  """Raises ConfigError for a partial_rotary_factor outside (0, 1], an odd or zero rotary dim,
  or a wrong `scaling` dict (`rope_scaling.check_scaling`)."""
  if not 0 < partial_rotary_factor <= 1:
    raise ConfigError(f"AttentionConfig.partial_rotary_factor={partial_rotary_factor} must be "
                      f"in (0, 1]: the fraction of head_dim that rotates.")
  dim = rotary_dim(head_dim, partial_rotary_factor)
  if dim < 2 or dim % 2:
    raise ConfigError(
        f"AttentionConfig.head_dim={head_dim} with partial_rotary_factor="
        f"{partial_rotary_factor} rotates {dim} features: RoPE needs an even number >= 2 (it "
        f"rotates pairs). Change head_dim or partial_rotary_factor, or set "
        f"AttentionConfig.position_encoding='none'.")
  if scaling is not None:
    check_scaling(scaling, dim)


def rope_parameters(head_dim: int, theta: float, scaling: dict | None = None,
                    partial_rotary_factor: float = 1.0, seq_len=None):
  """-> (inv_freq `[rotary_dim // 2]`, attention_factor float).

  inv_freq is float64 numpy, or float32 jax when seq_len is a jax array (decoding: only
  "dynamic" and "longrope" read it). seq_len: the current length (None: the original one).
  """
  check_rope(head_dim, scaling, partial_rotary_factor)
  rope_type = "default" if scaling is None else scaling["rope_type"]
  dim = rotary_dim(head_dim, partial_rotary_factor)
  inv_freq, attention_factor = INV_FREQ[rope_type](dim, theta, scaling, seq_len)
  return inv_freq, float(attention_factor)


def inv_frequencies(head_dim: int, theta: float) -> np.ndarray:
  """`[head_dim // 2]` float64: theta ** (-2i / head_dim), the rotation speed of pair i."""
  return rope_parameters(head_dim, theta)[0]


def angles_of(positions: jax.Array, inv_freq, angle_dtype: str = "float32") -> jax.Array:
  """`[batch, seq]` int, inv_freq `[pairs]` -> float32 angles `[batch, seq, pairs]`.

  float32 by default: exact positions up to 2**24, and at position 1e6 the angle is off by at
  most ~0.06 rad (one float32 ulp). angle_dtype="bfloat16" computes positions * inv_freq in
  bfloat16 (positions above 256 already round), reproducing the loss of relative-position
  information AnchorAttention (arXiv 2411.13476) reports for bfloat16 RoPE; opt-in, for
  experiments only.
  """
  if angle_dtype not in ANGLE_DTYPES:
    raise ValueError(f"angle_dtype={angle_dtype!r} is not one of {ANGLE_DTYPES}.")
  dt = jnp.dtype(angle_dtype)
  angles = positions.astype(dt)[..., None] * jnp.asarray(inv_freq, jnp.float32).astype(dt)
  return angles.astype(jnp.float32)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """`[batch, seq]` int -> (sin, cos), each float32 `[batch, seq, head_dim // 2]`, unscaled."""
  angles = angles_of(positions, inv_frequencies(head_dim, theta))
  return jnp.sin(angles), jnp.cos(angles)


def rotate(x: jax.Array, positions: jax.Array, inv_freq, attention_factor: float = 1.0,
           angle_dtype: str = "float32") -> jax.Array:
  """Rotates the first 2 * len(inv_freq) features of `x` `[batch, seq, heads, head_dim]` by its
  positions `[batch, seq]` (rotate-half), passes the rest through, and scales the rotated part
  by attention_factor (cos and sin both carry it, as in transformers).

  Computes in float32 and returns x.dtype.
  """
  angles = angles_of(positions, inv_freq, angle_dtype)[:, :, None, :]  # broadcast over heads
  sin, cos = jnp.sin(angles) * attention_factor, jnp.cos(angles) * attention_factor
  dim = 2 * angles.shape[-1]
  xf = x.astype(jnp.float32)
  x1, x2, rest = xf[..., :dim // 2], xf[..., dim // 2:dim], xf[..., dim:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return out.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, *, scaling: dict | None = None,
               partial_rotary_factor: float = 1.0, seq_len=None,
               angle_dtype: str = "float32") -> jax.Array:
  """Rotates `x` `[batch, seq, heads, head_dim]` by its positions `[batch, seq]` with RoPE of
  base theta, `scaling` (a `rope_scaling` dict or None) at the current length seq_len.

  Computes in float32 and returns x.dtype.
  """
  inv_freq, factor = rope_parameters(x.shape[-1], theta, scaling, partial_rotary_factor, seq_len)
  return rotate(x, positions, inv_freq, factor, angle_dtype)
