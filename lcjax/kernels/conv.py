"""The depthwise causal conv of Mamba-2, over packed documents."""

import jax
import jax.numpy as jnp


def causal_conv(u: jax.Array, weight: jax.Array, bias: jax.Array,
                segment_ids: jax.Array | None) -> jax.Array:
  """Depthwise causal conv: out[t] = bias + sum_k weight[k] * u[t - (K-1) + k].

  u `[batch, seq, channels]`, weight `[K, channels]`, bias `[channels]`; terms before the row
  start or from another segment (segment_ids `[batch, seq]`) are dropped. Accumulates in
  float32, returns u.dtype.
  """
  seq, width = u.shape[1], weight.shape[0]
  w = weight.astype(u.dtype).astype(jnp.float32)  # the weights as the compute dtype has them
  out = u.astype(jnp.float32) * w[width - 1] + bias.astype(u.dtype).astype(jnp.float32)
  for shift in range(1, min(width, seq)):  # further back is before the row start
    earlier = jnp.pad(u, ((0, 0), (shift, 0), (0, 0)))[:, :seq]
    if segment_ids is not None:
      same = jnp.pad(segment_ids, ((0, 0), (shift, 0)))[:, :seq] == segment_ids
      earlier = jnp.where(same[..., None], earlier, jnp.zeros_like(earlier))
    out = out + earlier.astype(jnp.float32) * w[width - 1 - shift]
  return out.astype(u.dtype)
