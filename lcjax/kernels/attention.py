"""Causal, document-masked attention: the reference and the one dispatch point.

Every attention kernel (the reference here; Pallas flash and cuDNN later) has the signature
`fn(q, k, v, segment_ids) -> out` and the same mask semantics, so the model calls `attention`
and never knows which one ran.

Shapes: q `[batch, seq, heads, head_dim]`; k, v `[batch, seq, kv_heads, head_dim]` with
heads % kv_heads == 0 (grouped-query: query head h reads kv head h // (heads // kv_heads));
segment_ids `[batch, seq]` int32, one id per packed document, 0 for padding.
"""

import jax
import jax.numpy as jnp


def attention_mask(segment_ids: jax.Array) -> jax.Array:
  """`[batch, seq]` -> bool `[batch, q_seq, kv_seq]`: causal by index and same segment.

  A token always sees itself, so no row is empty; padding (id 0) only sees padding.
  """
  seq = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
  same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
  return causal[None] & same_doc


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        segment_ids: jax.Array) -> jax.Array:
  """Materialises the `[seq, seq]` scores; float32 scores, softmax and sum; out in q.dtype."""
  batch, seq, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}.")
  f32 = jnp.float32
  # Group query heads by the kv head they share: h = kv * group + g.
  qg = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim).astype(f32)

  scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(f32)) / jnp.sqrt(f32(head_dim))
  mask = attention_mask(segment_ids)[:, None, None]  # [batch, 1, 1, q, kv]
  # Every row keeps its diagonal, so the finite minimum never fills a whole row.
  scores = jnp.where(mask, scores, jnp.finfo(f32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(f32))
  return out.reshape(batch, seq, heads, head_dim).astype(q.dtype)


IMPLS = {
    "reference": reference_attention,
}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
              impl: str = "reference") -> jax.Array:
  """Runs the attention kernel named `impl` (a key of `IMPLS`); shapes as in the module doc."""
  if impl not in IMPLS:
    raise ValueError(f"Unknown attention impl {impl!r}; choose one of {sorted(IMPLS)}.")
  return IMPLS[impl](q, k, v, segment_ids)
