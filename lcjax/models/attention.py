"""Grouped-query self-attention over packed documents, with optional RoPE and a KV cache."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.kernels.attention import attention
from lcjax.models.config import ModelConfig
from lcjax.models.layers import normal_param
from lcjax.models.rope import apply_rope
from lcjax.parallel.sequence import SequenceSharding


class KVCache(NamedTuple):
  """Keys and values (after RoPE) `[batch, max_len, kv_heads, head_dim]` in the compute dtype;
  index: int32 scalar, the number of filled positions (= the next token's position)."""
  k: jax.Array
  v: jax.Array
  index: jax.Array


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, length: jax.Array,
                     window: int | None = None, sinks: int = 0) -> jax.Array:
  """q `[batch, 1, heads, head_dim]` (at position length - 1) over the first `length` entries
  of the cache's k, v `[batch, max_len, kv_heads, head_dim]`, with the training mask's window
  and sinks; float32 scores and softmax, as the reference."""
  batch, _, heads, head_dim = q.shape
  kv_heads, max_len = k.shape[2], k.shape[1]
  f32 = jnp.float32
  qg = q.reshape(batch, 1, kv_heads, heads // kv_heads, head_dim).astype(f32)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(f32)) / jnp.sqrt(f32(head_dim))
  slots = jnp.arange(max_len)
  seen = slots < length
  if window is not None:
    seen &= (length - 1 - slots < window) | (slots < sinks)
  scores = jnp.where(seen, scores, jnp.finfo(f32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(f32))
  return out.reshape(batch, 1, heads, head_dim).astype(q.dtype)


class Attention(nnx.Module):
  """q/k/v/o projections (no biases) around `lcjax.kernels.attention.attention`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs,
               sequence: SequenceSharding | None = None):
    d, h, kvh, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q = normal_param(rngs, (d, h, hd), cfg.init_std, ("embed", "heads", "head_dim"))
    self.k = normal_param(rngs, (d, kvh, hd), cfg.init_std, ("embed", "kv_heads", "head_dim"))
    self.v = normal_param(rngs, (d, kvh, hd), cfg.init_std, ("embed", "kv_heads", "head_dim"))
    self.o = normal_param(rngs, (h, hd, d), cfg.output_init_std, ("heads", "head_dim", "embed"))
    self.rope_theta = cfg.rope_theta if cfg.position_encoding == "rope" else None
    self.dtype = cfg.compute_dtype
    self.window, self.sinks = cfg.attention_window, cfg.attention_sinks
    self.impl = cfg.attention_impl
    self.blocks = dict(block_q=cfg.attention_block_q, block_kv=cfg.attention_block_kv)
    self.sequence = sequence

  def _qkv(self, x: jax.Array, positions: jax.Array):
    dt = x.dtype
    q = jnp.einsum("bsd,dhk->bshk", x, self.q[...].astype(dt))
    k = jnp.einsum("bsd,dhk->bshk", x, self.k[...].astype(dt))
    v = jnp.einsum("bsd,dhk->bshk", x, self.v[...].astype(dt))
    if self.rope_theta is not None:
      q = apply_rope(q, positions, self.rope_theta)
      k = apply_rope(k, positions, self.rope_theta)
    return q, k, v

  def _out(self, out: jax.Array) -> jax.Array:
    return jnp.einsum("bshk,hkd->bsd", out, self.o[...].astype(out.dtype))

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
    """x `[batch, seq, embed]`, segment_ids/positions `[batch, seq]` -> `[batch, seq, embed]`."""
    q, k, v = self._qkv(x, positions)
    if self.sequence is not None:  # rows split over devices: ring / all-gather attention
      return self._out(self.sequence.attention(q, k, v, segment_ids, positions,
                                               window=self.window, sinks=self.sinks,
                                               impl=self.impl, **self.blocks))
    return self._out(attention(q, k, v, segment_ids, positions, window=self.window,
                               sinks=self.sinks, impl=self.impl, **self.blocks))

  # --- decoding (one document per row, positions 0, 1, ...) ---

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    shape = (batch, max_len, self.k.shape[1], self.k.shape[2])
    return KVCache(k=jnp.zeros(shape, self.dtype), v=jnp.zeros(shape, self.dtype),
                   index=jnp.zeros((), jnp.int32))

  def prefill(self, x: jax.Array, cache: KVCache, *,
              positions: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Attention over a prompt `[batch, k, embed]`, writing its keys/values into the empty
    `cache` (from `init_cache(batch, max_len)`, max_len >= k). positions default to 0..k-1."""
    batch, seq, _ = x.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    q, k, v = self._qkv(x, positions)
    y = self._out(attention(q, k, v, jnp.ones((batch, seq), jnp.int32), positions,
                            window=self.window, sinks=self.sinks, impl=self.impl))
    update = lambda buf, new: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype),
                                                           (0, 0, 0, 0))
    return y, KVCache(k=update(cache.k, k), v=update(cache.v, v),
                      index=jnp.asarray(seq, jnp.int32))

  def step(self, x: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One token `[batch, embed]` at position cache.index -> (`[batch, embed]`, cache).

    The caller keeps cache.index < max_len (past it, the write would be clamped).
    """
    batch = x.shape[0]
    positions = jnp.broadcast_to(cache.index, (batch, 1))
    q, k, v = self._qkv(x[:, None], positions)
    start = (0, cache.index, 0, 0)
    ks = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start)
    vs = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start)
    out = cached_attention(q, ks.astype(q.dtype), vs.astype(q.dtype), cache.index + 1,
                           self.window, self.sinks)
    return self._out(out)[:, 0], KVCache(k=ks, v=vs, index=cache.index + 1)
