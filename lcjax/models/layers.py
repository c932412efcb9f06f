"""Small parameter-owning layers: RMSNorm, token embedding, SwiGLU MLP.

Parameters are float32 and carry `logical_axes` (one name per dimension) for the sharding
rules in `lcjax.parallel`; they are cast to the activations' dtype where they are used.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.models.config import ModelConfig


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

  def attend(self, x: jax.Array) -> jax.Array:
    """`[batch, seq, embed]` -> float32 logits `[batch, seq, vocab]` (accumulated in float32)."""
    table = self.embedding[...].astype(x.dtype)
    return jnp.einsum("bsd,vd->bsv", x, table, preferred_element_type=jnp.float32)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)). A mixer, so it takes and ignores the extras."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, sequence=None):
    del sequence  # per token: a split sequence changes nothing
    d, f = cfg.d_model, cfg.mlp_dim
    self.gate = normal_param(rngs, (d, f), cfg.init_std, ("embed", "mlp"))
    self.up = normal_param(rngs, (d, f), cfg.init_std, ("embed", "mlp"))
    self.down = normal_param(rngs, (f, d), cfg.output_init_std, ("mlp", "embed"))

  def __call__(self, x: jax.Array, *, segment_ids=None, positions=None) -> jax.Array:
    """`[batch, seq, embed]` -> same shape and dtype."""
    del segment_ids, positions
    dt = x.dtype
    h = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
    return h @ self.down[...].astype(dt)

  # Decoding: stateless, so the cache is None (the interface of Attention and Mamba2).

  def init_cache(self, batch: int, max_len: int | None = None) -> None:
    del batch, max_len

  def prefill(self, x: jax.Array, cache=None, *, positions=None) -> tuple[jax.Array, None]:
    del cache, positions
    return self(x), None

  def step(self, x: jax.Array, cache=None) -> tuple[jax.Array, None]:
    """`[batch, embed]` -> `[batch, embed]`."""
    del cache
    return self(x), None
