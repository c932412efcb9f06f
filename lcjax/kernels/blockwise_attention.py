"""Blockwise (flash-style) attention in plain JAX: memory O(block_q * block_kv) per step.

Same signature, mask and results as `reference_attention` (`lcjax.kernels.attention`), but the
`[q_seq, kv_seq]` scores are never materialised. Rows are cut into query blocks and kv blocks;
for each query block a loop over kv blocks keeps, per query, the running max of the scores m,
the running sum of exp(score - m) and the unnormalised output (the online softmax, float32).
A tile (query block, kv block) that the mask hides entirely is skipped with `lax.cond`, decided
from the tiles' index ranges alone (`fully_masked`): with causal attention about half the tiles.

The backward is the flash backward: it recomputes each tile's probabilities from q, k and the
saved lse, P = exp(S - lse), and uses D = rowsum(dout * out):

    dV = P^T dout      dP = dout V^T      dS = P * (dP - D)      dQ = dS K / sqrt(d)   dK = ...

`blockwise_bwd` takes `out` and `lse` as arguments rather than recomputing them, so they may be
the output and lse of a larger attention of which these keys are only a part: ring attention
(`lcjax.parallel.ring_attention`) calls it once per kv block with the merged out/lse. P is then
the block's share of the global softmax and the formulas give exactly this block's contribution
to dq and the whole of dk, dv for these keys.

Lengths that are not multiples of the block are padded and the padding sliced off; padded keys
get segment id -2 and padded queries -1 (real ids are >= 0), so nothing sees them, and copies
of the last real index and position, so they do not widen the tiles' index ranges.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lcjax.kernels.mask import Tokens, check_mask_args, visible

f32 = jnp.float32
_PAD_QUERY, _PAD_KEY = -1, -2  # segment ids of padding tokens; differ so padding never matches


def fully_masked(q_tokens: Tokens, kv_tokens: Tokens, *, window: int | None,
                 sinks: int) -> jax.Array:
  """bool scalar: True if no query can see any key, judged from index ranges (and sinks).

  Conservative: False does not promise a visible pair (documents are not looked at). Used to
  skip tiles here and whole ring steps in ring attention; tokens may be traced.
  """
  masked = jnp.min(kv_tokens.index) > jnp.max(q_tokens.index)  # every key after every query
  if window is not None:
    too_old = jnp.min(q_tokens.index) - jnp.max(kv_tokens.index) >= window
    masked |= too_old & (jnp.min(kv_tokens.positions) >= sinks)
  return masked


def _pad_seq(x: jax.Array, length: int, value=0) -> jax.Array:
  """Pads axis 1 to `length`."""
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return jnp.pad(x, pad, constant_values=value)


def _pad_tokens(tokens: Tokens, length: int, segment_id: int) -> Tokens:
  def edge(x):
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1])), mode="edge")
  return Tokens(_pad_seq(tokens.segment_ids, length, segment_id), edge(tokens.index),
                edge(tokens.positions))


def _blocks(x: jax.Array, block: int) -> jax.Array:
  """`[batch, n * block, ...]` -> `[n, batch, block, ...]`, the leading axis to loop over."""
  batch, length = x.shape[:2]
  return jnp.moveaxis(x.reshape(batch, length // block, block, *x.shape[2:]), 1, 0)


def _unblocks(x: jax.Array) -> jax.Array:
  """Inverse of `_blocks`."""
  n, batch, block = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(batch, n * block, *x.shape[3:])


def _layout(q, k, block_q, block_kv):
  """Clamped block sizes and padded lengths; checks the head grouping."""
  heads, kv_heads = q.shape[2], k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}.")
  if block_q < 1 or block_kv < 1:
    raise ValueError(f"block_q={block_q} and block_kv={block_kv} must be >= 1.")
  # A block longer than the sequence would only add padding.
  block_q, block_kv = min(block_q, q.shape[1]), min(block_kv, k.shape[1])
  q_len = -(-q.shape[1] // block_q) * block_q
  kv_len = -(-k.shape[1] // block_kv) * block_kv
  return block_q, block_kv, q_len, kv_len


def _scores(q, k, q_tokens, kv_tokens, window, sinks):
  """One tile: q `[batch, bq, kv_heads, group, head_dim]`, k `[batch, bk, kv_heads, head_dim]`
  -> (float32 scores `[batch, kv_heads, group, bq, bk]` with -inf where masked, the mask)."""
  scale = 1.0 / jnp.sqrt(f32(q.shape[-1]))
  s = jnp.einsum("bqkgd,bskd->bkgqs", q.astype(f32), k.astype(f32)) * scale
  mask = visible(q_tokens, kv_tokens, window=window, sinks=sinks)[:, None, None]
  return jnp.where(mask, s, -jnp.inf), mask


def _group(x, kv_heads):
  """`[batch, seq, heads, ...]` -> `[batch, seq, kv_heads, group, ...]`: head h = kv * group + g."""
  return x.reshape(*x.shape[:2], kv_heads, x.shape[2] // kv_heads, *x.shape[3:])


def blockwise_fwd(q: jax.Array, k: jax.Array, v: jax.Array, q_tokens: Tokens, kv_tokens: Tokens,
                  *, window: int | None = None, sinks: int = 0, block_q: int = 512,
                  block_kv: int = 512, out_dtype=None) -> tuple[jax.Array, jax.Array]:
  """(out, lse) as `reference_attention`, one tile of scores at a time.

  out is in `out_dtype` (default q.dtype; ring attention asks for float32 to merge blocks
  without rounding); lse `[batch, heads, q_seq]` float32, -inf (and out 0) for queries that
  see nothing.
  """
  check_mask_args(window, sinks)
  batch, q_seq, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  block_q, block_kv, q_len, kv_len = _layout(q, k, block_q, block_kv)

  q_blocks = _blocks(_group(_pad_seq(q, q_len), kv_heads), block_q)
  q_tok_blocks = jax.tree.map(lambda x: _blocks(x, block_q),
                              _pad_tokens(q_tokens, q_len, _PAD_QUERY))
  k_blocks = _blocks(_pad_seq(k, kv_len), block_kv)
  v_blocks = _blocks(_pad_seq(v, kv_len), block_kv)
  kv_tok_blocks = jax.tree.map(lambda x: _blocks(x, block_kv),
                               _pad_tokens(kv_tokens, kv_len, _PAD_KEY))

  def one_query_block(args):
    qb, q_tok = args  # [batch, bq, kv_heads, group, head_dim], Tokens [batch, bq]

    def add_tile(carry, kv):
      kb, vb, kv_tok = kv

      def update(carry):
        acc, m, l = carry
        s, _ = _scores(qb, kb, q_tok, kv_tok, window, sinks)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        # Rows that have seen nothing yet keep m = -inf; shift them by 0 to avoid inf - inf.
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - shift[..., None])
        rescale = jnp.exp(m - shift)  # 0 while m = -inf
        acc = rescale[..., None] * acc + jnp.einsum("bkgqs,bskd->bkgqd", p, vb.astype(f32))
        return acc, m_new, rescale * l + jnp.sum(p, axis=-1)

      skip = fully_masked(q_tok, kv_tok, window=window, sinks=sinks)
      return lax.cond(skip, lambda c: c, update, carry), None

    # [batch, kv_heads, group, bq]; zeros_like/full_like keep shard_map's varying axes of q.
    m0 = jnp.full_like(jnp.moveaxis(qb[..., 0], 1, -1), -jnp.inf, dtype=f32)
    acc0 = jnp.zeros_like(jnp.moveaxis(qb, 1, -2), dtype=f32)
    (acc, m, l), _ = lax.scan(add_tile, (acc0, m0, jnp.zeros_like(m0)),
                              (k_blocks, v_blocks, kv_tok_blocks))
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    return acc / safe_l[..., None], jnp.where(seen, m + jnp.log(safe_l), -jnp.inf)

  out, lse = lax.map(one_query_block, (q_blocks, q_tok_blocks))
  # out [n, batch, kv_heads, group, bq, d] -> [batch, q_seq, heads, d]; lse -> [batch, heads, q_seq]
  out = _unblocks(jnp.moveaxis(out, -2, 2)).reshape(batch, q_len, heads, head_dim)[:, :q_seq]
  lse = jnp.moveaxis(lse, 0, -2).reshape(batch, heads, q_len)[..., :q_seq]
  return out.astype(q.dtype if out_dtype is None else out_dtype), lse


def blockwise_bwd(q: jax.Array, k: jax.Array, v: jax.Array, q_tokens: Tokens, kv_tokens: Tokens,
                  out: jax.Array, lse: jax.Array, dout: jax.Array, *, window: int | None = None,
                  sinks: int = 0, block_q: int = 512, block_kv: int = 512,
                  dlse: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dq, dk, dv), float32, of attention whose output was `out` with log-sum-exp `lse`.

  out `[batch, q_seq, heads, head_dim]` and lse `[batch, heads, q_seq]` may belong to a larger
  attention over these and other keys (see the module doc): then dq is these keys' share of
  the gradient and dk, dv are complete. dout is the cotangent of out, dlse (optional, like lse)
  that of lse. Rows with lse = -inf contribute nothing. Float32 so that callers summing several
  contributions (ring attention) round once.
  """
  check_mask_args(window, sinks)
  batch, q_seq, heads, head_dim = q.shape
  kv_seq, kv_heads = k.shape[1], k.shape[2]
  block_q, block_kv, q_len, kv_len = _layout(q, k, block_q, block_kv)
  scale = 1.0 / jnp.sqrt(f32(head_dim))

  # delta = rowsum(dout * out) - dlse, so that dS = P * (dP - delta): d lse / dS = P.
  delta = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1)  # [batch, q_seq, heads]
  if dlse is not None:
    delta -= jnp.swapaxes(dlse.astype(f32), 1, 2)

  def query_blocks(x, value=0):
    """`[batch, q_seq, heads, ...]` -> `[n, batch, bq, kv_heads, group, ...]`."""
    return _blocks(_group(_pad_seq(x, q_len, value), kv_heads), block_q)

  q_blocks, dout_blocks = query_blocks(q), query_blocks(dout)
  # Padded query rows get lse = -inf: no contribution. [n, batch, bq, kv_heads, group]
  lse_blocks = query_blocks(jnp.swapaxes(lse, 1, 2), -jnp.inf)
  delta_blocks = query_blocks(delta)
  q_tok_blocks = jax.tree.map(lambda x: _blocks(x, block_q),
                              _pad_tokens(q_tokens, q_len, _PAD_QUERY))
  k_blocks = _blocks(_pad_seq(k, kv_len), block_kv)
  v_blocks = _blocks(_pad_seq(v, kv_len), block_kv)
  kv_tok_blocks = jax.tree.map(lambda x: _blocks(x, block_kv),
                               _pad_tokens(kv_tokens, kv_len, _PAD_KEY))

  def one_kv_block(dq, kv):
    kb, vb, kv_tok = kv

    def add_tile(i, carry):
      dq, dk, dv = carry
      qb, dob, q_tok = q_blocks[i], dout_blocks[i], jax.tree.map(lambda x: x[i], q_tok_blocks)
      # [batch, bq, kv_heads, group] -> [batch, kv_heads, group, bq, 1], like the scores' rows.
      lse_i, delta_i = (jnp.moveaxis(x[i], 1, -1)[..., None] for x in (lse_blocks, delta_blocks))

      def grads():
        s, mask = _scores(qb, kb, q_tok, kv_tok, window, sinks)
        seen = mask & jnp.isfinite(lse_i)
        p = jnp.where(seen, jnp.exp(s - jnp.where(seen, lse_i, 0.0)), 0.0)
        dob32 = dob.astype(f32)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", dob32, vb.astype(f32))
        ds = p * (dp - delta_i) * scale  # the scale of the scores, moved onto dS
        return (jnp.einsum("bkgqs,bskd->bqkgd", ds, kb.astype(f32)),  # dq
                jnp.einsum("bkgqs,bqkgd->bskd", ds, qb.astype(f32)),  # dk
                jnp.einsum("bkgqs,bqkgd->bskd", p, dob32))  # dv

      def nothing():
        return jnp.zeros_like(dq[i]), jnp.zeros_like(dk), jnp.zeros_like(dv)

      skip = fully_masked(q_tok, kv_tok, window=window, sinks=sinks)
      dq_tile, dk_tile, dv_tile = lax.cond(skip, nothing, grads)
      return dq.at[i].add(dq_tile), dk + dk_tile, dv + dv_tile

    zeros_k = jnp.zeros_like(kb, dtype=f32)
    dq, dk, dv = lax.fori_loop(0, q_blocks.shape[0], add_tile, (dq, zeros_k, zeros_k))
    return dq, (dk, dv)

  dq0 = jnp.zeros_like(q_blocks, dtype=f32)
  dq, (dk, dv) = lax.scan(one_kv_block, dq0, (k_blocks, v_blocks, kv_tok_blocks))
  dq = _unblocks(dq).reshape(batch, q_len, heads, head_dim)[:, :q_seq]
  return dq, _unblocks(dk)[:, :kv_seq], _unblocks(dv)[:, :kv_seq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _attention(q, k, v, q_tokens, kv_tokens, window, sinks, block_q, block_kv):
  return blockwise_fwd(q, k, v, q_tokens, kv_tokens, window=window, sinks=sinks,
                       block_q=block_q, block_kv=block_kv)


def _attention_fwd(q, k, v, q_tokens, kv_tokens, window, sinks, block_q, block_kv):
  out, lse = _attention(q, k, v, q_tokens, kv_tokens, window, sinks, block_q, block_kv)
  return (out, lse), (q, k, v, q_tokens, kv_tokens, out, lse)


def _attention_bwd(window, sinks, block_q, block_kv, residuals, cotangents):
  q, k, v, q_tokens, kv_tokens, out, lse = residuals
  dout, dlse = cotangents
  dq, dk, dv = blockwise_bwd(q, k, v, q_tokens, kv_tokens, out, lse, dout, window=window,
                             sinks=sinks, block_q=block_q, block_kv=block_kv, dlse=dlse)
  # The tokens are integers: no cotangent.
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_tokens: Tokens,
                        kv_tokens: Tokens, *, window: int | None = None, sinks: int = 0,
                        block_q: int = 512, block_kv: int = 512) -> tuple[jax.Array, jax.Array]:
  """(out, lse) like `reference_attention`, differentiable in q, k, v through both outputs,
  with the blockwise backward (saves only q, k, v, tokens, out and lse)."""
  return _attention(q, k, v, q_tokens, kv_tokens, window, sinks, block_q, block_kv)
