"""Rotary position embeddings (RoPE) as pure functions.

Rotate-half convention (GPT-NeoX / Llama in Hugging Face): the feature pairs rotated together
are (i, i + head_dim/2), not adjacent features (i, i+1) as in the original RoFormer/GPT-J.

Positions always come from the batch, `[batch, seq]` int32, so they restart at 0 for every
packed document; never from an arange over the row.
"""

import jax
import jax.numpy as jnp
import numpy as np


def inv_frequencies(head_dim: int, theta: float) -> np.ndarray:
  """`[head_dim // 2]` float64: theta ** (-2i / head_dim), the rotation speed of pair i.

  Context-extension scalings (PI, NTK-aware, YaRN, Llama-3) are all rewrites of this vector
  (YaRN also rescales attention), so they will slot in here and leave the rest untouched.
  """
  return theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """`[batch, seq]` int -> (sin, cos), each float32 `[batch, seq, head_dim // 2]`.

  Always float32: at position 1e5 a bfloat16 angle would be off by hundreds of radians.
  """
  inv_freq = jnp.asarray(inv_frequencies(head_dim, theta), dtype=jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotates `x` `[batch, seq, heads, head_dim]` by its positions `[batch, seq]`.

  Computes in float32 and returns x.dtype.
  """
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
  sin, cos = rope_angles(positions, head_dim, theta)
  sin, cos = sin[:, :, None, :], cos[:, :, None, :]  # broadcast over heads
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
