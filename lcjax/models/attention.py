"""Grouped-query self-attention over packed documents, with optional RoPE."""

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.kernels.attention import attention
from lcjax.models.config import ModelConfig
from lcjax.models.layers import normal_param
from lcjax.models.rope import apply_rope


class Attention(nnx.Module):
  """q/k/v/o projections (no biases) around `lcjax.kernels.attention.attention`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, kvh, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q = normal_param(rngs, (d, h, hd), cfg.init_std, ("embed", "heads", "head_dim"))
    self.k = normal_param(rngs, (d, kvh, hd), cfg.init_std, ("embed", "kv_heads", "head_dim"))
    self.v = normal_param(rngs, (d, kvh, hd), cfg.init_std, ("embed", "kv_heads", "head_dim"))
    self.o = normal_param(rngs, (h, hd, d), cfg.output_init_std, ("heads", "head_dim", "embed"))
    self.rope_theta = cfg.rope_theta if cfg.position_encoding == "rope" else None

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
    """x `[batch, seq, embed]`, segment_ids/positions `[batch, seq]` -> `[batch, seq, embed]`."""
    dt = x.dtype
    q = jnp.einsum("bsd,dhk->bshk", x, self.q[...].astype(dt))
    k = jnp.einsum("bsd,dhk->bshk", x, self.k[...].astype(dt))
    v = jnp.einsum("bsd,dhk->bshk", x, self.v[...].astype(dt))
    if self.rope_theta is not None:
      q = apply_rope(q, positions, self.rope_theta)
      k = apply_rope(k, positions, self.rope_theta)
    out = attention(q, k, v, segment_ids)
    return jnp.einsum("bshk,hkd->bsd", out, self.o[...].astype(dt))
