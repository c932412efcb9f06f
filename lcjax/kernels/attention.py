"""Masked attention: the reference, decoding with a KV cache, and the dispatch.

Every attention implementation has the signature
`fn(q, k, v, q_tokens, kv_tokens, *, mask, block_q, block_kv) -> (out, lse)` and the same mask,
so the model calls `attention` and never knows which one ran; ring attention
(`lcjax.parallel`) calls the same functions on blocks and merges them by their log-sum-exp.

Shapes: q `[batch, q_seq, heads, head_dim]`; k, v `[batch, kv_seq, kv_heads, head_dim]` with
heads % kv_heads == 0 (grouped-query: query head h reads kv head h // (heads // kv_heads));
out like q; lse `[batch, heads, q_seq]` float32, the natural log of the sum over visible keys of
exp(q.k / sqrt(head_dim)), -inf for a query that sees no key (out is 0 there).

The mask is `lcjax.kernels.mask.Mask`: causal by each token's original index, within its
document, optionally a sliding window with sink tokens, groups (S²-Attn) and a shared anchor.

Implementations (`IMPLS`, picked by `ATTENTION`): "reference" (materialises the scores; the
ground truth), "blockwise" (flash-style tiles in plain JAX: O(block^2) memory, any backend),
"pallas" (the Pallas flash kernel: Triton on GPU, Mosaic on TPU, interpret mode on CPU), "xla"
(`jax.nn.dot_product_attention`, cuDNN on GPU where it applies; gives no lse). The reference and
"xla" take block_q / block_kv and ignore them.
"""

import jax
import jax.numpy as jnp

from lcjax.kernels import blockwise_attention, flash_attention
from lcjax.kernels.dispatch import Dispatch
from lcjax.kernels.mask import Mask, Tokens, row_tokens
from lcjax.kernels.tiles import PAD_KEY, merge


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_tokens: Tokens,
                        kv_tokens: Tokens, *, mask: Mask = Mask(), block_q: int | None = None,
                        block_kv: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Materialises the `[q_seq, kv_seq]` scores; float32 scores, softmax and sums."""
  del block_q, block_kv  # no tiles
  batch, q_seq, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}.")
  f32 = jnp.float32
  # Group query heads by the kv head they share: h = kv * group + g.
  qg = q.reshape(batch, q_seq, kv_heads, heads // kv_heads, head_dim).astype(f32)
  # Scale q and normalise the output rather than the [q_seq, kv_seq] scores and probabilities.
  scores = jnp.einsum("bqkgd,bskd->bkgqs", qg / jnp.sqrt(f32(head_dim)), k.astype(f32))
  scores = jnp.where(mask.dense(q_tokens, kv_tokens)[:, None, None], scores, -jnp.inf)
  # The max only shifts for stability (it cancels); rows that see nothing keep a finite shift.
  row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1))  # [b, kv_heads, group, q]
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  probs = jnp.exp(scores - row_max[..., None])
  total = jnp.sum(probs, axis=-1)
  seen = total > 0
  total = jnp.where(seen, total, 1.0)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(f32))
  out = out / jnp.moveaxis(total, 3, 1)[..., None]
  lse = jnp.where(seen, row_max + jnp.log(total), -jnp.inf)
  return (out.reshape(batch, q_seq, heads, head_dim).astype(q.dtype),
          lse.reshape(batch, heads, q_seq))


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, length: jax.Array,
                     *, start: jax.Array | None = None, mask: Mask = Mask(),
                     sink_queries: jax.Array | None = None) -> jax.Array:
  """One decoding step: q `[batch, 1, heads, head_dim]` in slot length - 1 over the slots
  [start, length) of the cache's k, v `[batch, max_len, kv_heads, head_dim]` -> out like q.

  The cache holds one document per row: slot s is its token at position s - start (the causal
  index is the slot). Slots before `start` (left padding of a shorter prompt) and from `length`
  on are padding. length: int32 scalar (or `[batch]`), > start; start: int32 `[batch]` (or
  scalar), None for 0. Float32 scores and softmax, as the reference.

  sink_queries `[batch, mask.sinks, heads, head_dim]` (a window with sinks only): the query to
  score sink j with when it lies beyond the window, in place of q (LM-Infinite's distance limit:
  q rotated to a capped distance from sink j, by the caller, who knows the RoPE).
  `mask.anchor` changes nothing here: the row is one document, so its first real slot (the
  anchor, if the prompt starts with one) is visible anyway, and padding slots never are.
  """
  batch, max_len = k_cache.shape[:2]
  column = lambda a: jnp.broadcast_to(jnp.reshape(jnp.asarray(a, jnp.int32), (-1, 1)), (batch, 1))
  last, first = column(length) - 1, column(0 if start is None else start)
  slots = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (batch, max_len))
  real = (slots >= first) & (slots <= last)
  kv_tokens = Tokens(jnp.where(real, 1, PAD_KEY), slots, slots - first)
  q_tokens = Tokens(jnp.ones_like(last), last, last - first)
  if sink_queries is None:
    return reference_attention(q, k_cache, v_cache, q_tokens, kv_tokens, mask=mask)[0]
  # The window alone, then the sinks beyond it, merged by their log-sum-exp.
  out, lse = reference_attention(q, k_cache, v_cache, q_tokens, kv_tokens,
                                 mask=Mask(window=mask.window))
  far_out, far_lse = _far_sinks(sink_queries, k_cache, v_cache, first, last, mask.window)
  out, _ = merge(out[:, 0].astype(jnp.float32), lse, far_out, far_lse)  # rows: the heads
  return out[:, None].astype(q.dtype)


def _far_sinks(sink_q, k_cache, v_cache, first, last, window):
  """The sinks beyond the window, each scored with its own query: sink_q `[batch, sinks, heads,
  d]`, first/last `[batch, 1]` -> (out `[batch, heads, d]` float32, lse `[batch, heads, 1]`)."""
  batch, sinks, heads, head_dim = sink_q.shape
  kv_heads = k_cache.shape[2]
  slot = first + jnp.arange(sinks, dtype=jnp.int32)  # [batch, sinks]
  k = jnp.take_along_axis(k_cache, slot[:, :, None, None], axis=1).astype(jnp.float32)
  v = jnp.take_along_axis(v_cache, slot[:, :, None, None], axis=1).astype(jnp.float32)
  group = heads // kv_heads  # query head h reads kv head h // group
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  scores = jnp.einsum("bjhd,bjhd->bhj", sink_q.astype(jnp.float32), k) / jnp.sqrt(
      jnp.float32(head_dim))
  far = (last - slot >= window)[:, None, :]  # [batch, 1, sinks]; never past the query
  scores = jnp.where(far, scores, -jnp.inf)
  lse = jax.nn.logsumexp(scores, axis=-1, keepdims=True)
  probs = jnp.where(far, jnp.exp(scores - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)
  return jnp.einsum("bhj,bjhd->bhd", probs, v), lse


def _pallas(q, k, v, q_tokens, kv_tokens, *, mask, block_q=128, block_kv=128):
  # On CPU there is no Pallas compiler: interpret mode (slow; for tests).
  return flash_attention.flash_attention(q, k, v, q_tokens, kv_tokens, mask=mask,
                                         block_q=block_q, block_kv=block_kv,
                                         interpret=jax.default_backend() == "cpu")


def _xla(q, k, v, q_tokens, kv_tokens, *, mask, block_q=None, block_kv=None):
  """XLA's fused attention (cuDNN on GPU when it takes the shapes); no lse."""
  del block_q, block_kv  # no tiles
  visible = mask.dense(q_tokens, kv_tokens)[:, None]  # [batch, 1, q_seq, kv_seq]
  return jax.nn.dot_product_attention(q, k, v, mask=visible), None


IMPLS = {
    "reference": reference_attention,
    "blockwise": blockwise_attention.blockwise_attention,
    "pallas": _pallas,
    "xla": _xla,
}

# "auto" is "blockwise" on every backend: it never materialises a [seq, seq] array, and on CPU
# it is 1.3-1.9x faster than the others from 1K tokens up (bench/README.md). The Pallas kernels
# pass their interpret-mode tests and lower for Triton and Mosaic, but have no GPU/TPU table
# yet: until one is taken they are opt-in (AttentionConfig.impl="pallas").
ATTENTION = Dispatch("attention", IMPLS, auto="blockwise",
                     supports={"pallas": flash_attention.supports})


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
              positions: jax.Array | None = None, *, mask: Mask = Mask(), impl: str = "auto",
              block_q: int = 128, block_kv: int = 128) -> jax.Array:
  """Self-attention over whole rows with the implementation named `impl` ("auto" or a key of
  `IMPLS`).

  q, k, v as in the module doc with q_seq = kv_seq; segment_ids, positions `[batch, seq]`
  (positions default to 0..seq-1, one document per row). Returns out `[batch, seq, heads,
  head_dim]`. block_q / block_kv: the tiles of the tiled implementations.
  """
  tokens = row_tokens(segment_ids, positions)
  impl = ATTENTION.resolve(impl, q, k, v, block_q=block_q, block_kv=block_kv)
  return IMPLS[impl](q, k, v, tokens, tokens, mask=mask, block_q=block_q, block_kv=block_kv)[0]
