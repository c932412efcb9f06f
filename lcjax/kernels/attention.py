"""Masked attention: the mask every implementation shares, the reference, and the dispatch.

Every attention implementation has the signature
`fn(q, k, v, q_tokens, kv_tokens, *, window, sinks) -> (out, lse)` and the same mask, so the
model calls `attention` and never knows which one ran; ring attention (`lcjax.parallel`) calls
the same functions on blocks and merges them by their log-sum-exp.

Shapes: q `[batch, q_seq, heads, head_dim]`; k, v `[batch, kv_seq, kv_heads, head_dim]` with
heads % kv_heads == 0 (grouped-query: query head h reads kv head h // (heads // kv_heads));
out like q; lse `[batch, heads, q_seq]` float32, the natural log of the sum over visible keys of
exp(q.k / sqrt(head_dim)), -inf for a query that sees no key (out is 0 there).

The mask (`visible`): query i sees key j iff they are in the same document, j is not after i,
and, with a sliding window, j is one of the last `window` tokens up to i or one of the first
`sinks` tokens of the document (attention sinks, StreamingLLM). "After" is by `Tokens.index`,
the token's place in the unpermuted row, so sequence layouts that reorder tokens keep the mask.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Tokens(NamedTuple):
  """What the mask needs to know about each token; each `[batch, seq]` int32."""
  segment_ids: jax.Array  # the packed document the token belongs to (0: padding)
  index: jax.Array  # its place in the original row: the causal order
  positions: jax.Array  # its position within its document: sinks are positions < sinks


def row_tokens(segment_ids: jax.Array, positions: jax.Array | None = None) -> Tokens:
  """Tokens of whole, unpermuted rows: index = 0..seq-1; positions default to the index."""
  batch, seq = segment_ids.shape
  index = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  return Tokens(segment_ids, index, index if positions is None else positions)


def check_mask_args(window: int | None, sinks: int) -> None:
  if window is not None and window < 1:
    raise ValueError(f"window={window} must be >= 1 (the token itself), or None for no window.")
  if sinks < 0:
    raise ValueError(f"sinks={sinks} must be >= 0.")


def visible(q: Tokens, kv: Tokens, *, window: int | None = None, sinks: int = 0) -> jax.Array:
  """bool `[batch, q_seq, kv_seq]`: which keys each query attends to (see the module doc)."""
  qi, kj = q.index[:, :, None], kv.index[:, None, :]
  mask = (q.segment_ids[:, :, None] == kv.segment_ids[:, None, :]) & (kj <= qi)
  if window is not None:
    mask &= (qi - kj < window) | (kv.positions[:, None, :] < sinks)
  return mask


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_tokens: Tokens,
                        kv_tokens: Tokens, *, window: int | None = None,
                        sinks: int = 0) -> tuple[jax.Array, jax.Array]:
  """Materialises the `[q_seq, kv_seq]` scores; float32 scores, softmax and sums."""
  batch, q_seq, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}.")
  f32 = jnp.float32
  # Group query heads by the kv head they share: h = kv * group + g.
  qg = q.reshape(batch, q_seq, kv_heads, heads // kv_heads, head_dim).astype(f32)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(f32)) / jnp.sqrt(f32(head_dim))
  mask = visible(q_tokens, kv_tokens, window=window, sinks=sinks)[:, None, None]
  scores = jnp.where(mask, scores, -jnp.inf)
  # The max only shifts for stability (it cancels); rows that see nothing keep a finite shift.
  row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  probs = jnp.exp(scores - row_max)
  total = jnp.sum(probs, axis=-1, keepdims=True)
  seen = total > 0
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs / jnp.where(seen, total, 1.0), v.astype(f32))
  lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
  return (out.reshape(batch, q_seq, heads, head_dim).astype(q.dtype),
          lse.reshape(batch, heads, q_seq))


IMPLS = {
    "reference": reference_attention,
}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
              positions: jax.Array | None = None, *, window: int | None = None, sinks: int = 0,
              impl: str = "reference") -> jax.Array:
  """Self-attention over whole rows with the implementation named `impl` (a key of `IMPLS`).

  q, k, v as in the module doc with q_seq = kv_seq; segment_ids, positions `[batch, seq]`
  (positions default to 0..seq-1, one document per row). Returns out `[batch, seq, heads,
  head_dim]`.
  """
  if impl not in IMPLS:
    raise ValueError(f"Unknown attention impl {impl!r}; choose one of {sorted(IMPLS)}.")
  check_mask_args(window, sinks)
  tokens = row_tokens(segment_ids, positions)
  return IMPLS[impl](q, k, v, tokens, tokens, window=window, sinks=sinks)[0]
