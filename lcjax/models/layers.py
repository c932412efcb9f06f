"""Small parameter-owning layers (RMSNorm, token embedding) and what every mixer is built with.

Parameters are float32 and carry `logical_axes` (one name per dimension) for the sharding
rules in `lcjax.parallel`; they are cast to the activations' dtype where they are used.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ModelWide:
  """The model-wide numbers a mixer is built with besides its own config
  (`lcjax.models.config.ModelConfig.wide`)."""
  d_model: int
  dtype: jnp.dtype  # the compute dtype
  init_std: float  # projections that read the residual stream
  output_init_std: float  # projections that write into it
  norm_eps: float


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float,
                 logical_axes: tuple[str, ...]) -> nnx.Param:
  value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value, logical_axes=logical_axes)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """`[..., dim]` normalised by its root mean square, in float32; returns x.dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale).astype(x.dtype)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("norm",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)


class Embed(nnx.Module):
  """Token embedding `[vocab, embed]`; `attend` reuses it as the (tied) LM head."""

  def __init__(self, vocab_size: int, dim: int, *, std: float, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.embedding = normal_param(rngs, (vocab_size, dim), std, ("vocab", "embed"))
    self.dtype = dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    """`[batch, seq]` int -> `[batch, seq, embed]` in the compute dtype."""
    return self.embedding[...][ids].astype(self.dtype)
