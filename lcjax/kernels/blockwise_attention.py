"""Blockwise (flash-style) attention in plain JAX: memory O(block_q * block_kv) per step.

Same signature, mask and results as `reference_attention` (`lcjax.kernels.attention`), but the
`[q_seq, kv_seq]` scores are never materialised. Rows are cut into query blocks and kv blocks;
for each query block a loop over kv blocks keeps, per query, the running max of the scores m,
the running sum of exp(score - m) and the unnormalised output (the online softmax of
`lcjax.kernels.tiles`, float32). A tile (query block, kv block) that the mask hides entirely in
every row of the batch is skipped with `lax.cond`, decided from the blocks' token ranges alone
(`Mask.live`): with causal attention about half the tiles.

A tile holds a query block of every head of a kv head's group as its rows, `[batch, kv_heads,
group * block_q, head_dim]`, against that kv head's keys, so grouped-query attention never
repeats k, v.

The backward is the flash backward: it recomputes each tile's probabilities from q, k and the
saved lse, P = exp(S - lse), and uses D = rowsum(dout * out):

    dV = P^T dout      dP = dout V^T      dS = P * (dP - D)      dQ = dS K / sqrt(d)   dK = ...

`blockwise_bwd` takes `out` and `lse` as arguments rather than recomputing them, so they may be
the output and lse of a larger attention of which these keys are only a part: ring attention
(`lcjax.parallel.ring_attention`) calls it once per kv block with the merged out/lse. P is then
the block's share of the global softmax and the formulas give exactly this block's contribution
to dq and the whole of dk, dv for these keys.

Lengths that are not multiples of the block are padded (`tiles.pad_tokens`) and the padding
sliced off.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lcjax.kernels import tiles
from lcjax.kernels.mask import Mask, Tokens, block_ranges

f32 = jnp.float32


def _to_rows(x: jax.Array, block: int, kv_heads: int) -> jax.Array:
  """`[batch, n * block, heads, ...]` -> `[n, batch, kv_heads, group * block, ...]`."""
  batch, length, heads = x.shape[:3]
  x = x.reshape(batch, length // block, block, kv_heads, heads // kv_heads, *x.shape[3:])
  x = jnp.moveaxis(x, (1, 2), (0, 4))  # [n, batch, kv_heads, group, block, ...]
  return x.reshape(*x.shape[:3], -1, *x.shape[5:])


def _from_rows(x: jax.Array, group: int) -> jax.Array:
  """Inverse of `_to_rows`: -> `[batch, n * block, kv_heads * group, ...]`."""
  n, batch, kv_heads = x.shape[:3]
  x = x.reshape(n, batch, kv_heads, group, -1, *x.shape[4:])
  x = jnp.moveaxis(x, (0, 4), (1, 2))  # [batch, n, block, kv_heads, group, ...]
  return x.reshape(batch, -1, kv_heads * group, *x.shape[5:])


def _stat_rows(x: jax.Array, block: int, kv_heads: int, value=0.0) -> jax.Array:
  """Row statistics `[batch, heads, seq]` -> `[n, batch, kv_heads, group * block, 1]`, padded
  with `value`."""
  length = -(-x.shape[2] // block) * block
  return _to_rows(tiles.pad_axis(x.swapaxes(1, 2), 1, length, value)[..., None], block, kv_heads)


class _Layout:
  """The blocks of one call: padded and cut tokens, which tiles are live, q, k, v in tiles."""

  def __init__(self, q, k, q_tokens, kv_tokens, mask: Mask, block_q: int, block_kv: int):
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
      raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}.")
    if block_q < 1 or block_kv < 1:
      raise ValueError(f"block_q={block_q} and block_kv={block_kv} must be >= 1.")
    # A block longer than the sequence would only add padding.
    self.block_q, self.block_kv = min(block_q, q.shape[1]), min(block_kv, k.shape[1])
    self.q_len = -(-q.shape[1] // self.block_q) * self.block_q
    self.kv_len = -(-k.shape[1] // self.block_kv) * self.block_kv
    self.kv_heads, self.group = kv_heads, heads // kv_heads
    q_tokens = tiles.pad_tokens(q_tokens, self.q_len, is_kv=False)
    kv_tokens = tiles.pad_tokens(kv_tokens, self.kv_len, is_kv=True)
    live = mask.live_pairs(block_ranges(q_tokens, self.block_q, q.shape[1]),
                           block_ranges(kv_tokens, self.block_kv, k.shape[1]))
    self.live = jnp.any(live, axis=0)  # [nq, nk]: some row of the batch needs the tile
    # Query tokens repeated for each head of the group, like the rows of a tile.
    group_rows = lambda x: _to_rows(
        jnp.broadcast_to(x[:, :, None], (*x.shape, self.group)), self.block_q, 1)[:, :, 0]
    self.q_tokens = Tokens(*map(group_rows, q_tokens))  # [nq, batch, group * block_q]
    self.kv_tokens = Tokens(*(_to_rows(x[:, :, None], self.block_kv, 1)[:, :, 0]
                              for x in kv_tokens))  # [nk, batch, block_kv]
    self.scale = q.shape[3] ** -0.5

  def q_rows(self, x):
    return _to_rows(tiles.pad_axis(x, 1, self.q_len), self.block_q, self.kv_heads)

  def kv_rows(self, x):
    return _to_rows(tiles.pad_axis(x, 1, self.kv_len), self.block_kv, self.kv_heads)


def _tile_mask(mask: Mask, q_tok: Tokens, kv_tok: Tokens) -> jax.Array:
  """bool `[batch, 1, group * block_q, block_kv]`, broadcasting over kv heads."""
  return mask.dense(q_tok, kv_tok)[:, None]


def blockwise_fwd(q: jax.Array, k: jax.Array, v: jax.Array, q_tokens: Tokens, kv_tokens: Tokens,
                  *, mask: Mask = Mask(), block_q: int = 512, block_kv: int = 512,
                  out_dtype=None) -> tuple[jax.Array, jax.Array]:
  """(out, lse) as `reference_attention`, one tile of scores at a time.

  out is in `out_dtype` (default q.dtype; ring attention asks for float32 to merge blocks
  without rounding); lse `[batch, heads, q_seq]` float32, -inf (and out 0) for queries that
  see nothing.
  """
  lay = _Layout(q, k, q_tokens, kv_tokens, mask, block_q, block_kv)
  kv_blocks = (lay.kv_rows(k), lay.kv_rows(v), lay.kv_tokens)

  def one_query_block(args):
    qb, q_tok, live = args  # [batch, kv_heads, rows, head_dim], Tokens [batch, rows], [nk]
    qb = qb.astype(f32)

    def add_tile(state, kv):
      kb, vb, kv_tok, live = kv

      def update(state):
        s = tiles.scores(qb, kb.astype(f32), lay.scale, _tile_mask(mask, q_tok, kv_tok))
        return tiles.softmax_step(s, vb.astype(f32), *state)

      return lax.cond(live, update, lambda s: s, state), None

    # full_like/zeros_like keep shard_map's varying axes of q.
    m0 = jnp.full_like(qb[..., :1], -jnp.inf)
    state, _ = lax.scan(add_tile, (m0, jnp.zeros_like(m0), jnp.zeros_like(qb)),
                        (*kv_blocks, live))
    return tiles.softmax_finish(*state)

  out, lse = lax.map(one_query_block, (lay.q_rows(q), lay.q_tokens, lay.live))
  q_seq = q.shape[1]
  out = _from_rows(out, lay.group)[:, :q_seq]
  lse = _from_rows(lse, lay.group)[:, :q_seq, :, 0].swapaxes(1, 2)
  return out.astype(q.dtype if out_dtype is None else out_dtype), lse


def blockwise_bwd(q: jax.Array, k: jax.Array, v: jax.Array, q_tokens: Tokens, kv_tokens: Tokens,
                  out: jax.Array, lse: jax.Array, dout: jax.Array, *, mask: Mask = Mask(),
                  block_q: int = 512, block_kv: int = 512,
                  dlse: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dq, dk, dv), float32, of attention whose output was `out` with log-sum-exp `lse`.

  out `[batch, q_seq, heads, head_dim]` and lse `[batch, heads, q_seq]` may belong to a larger
  attention over these and other keys (see the module doc): then dq is these keys' share of
  the gradient and dk, dv are complete. dout is the cotangent of out, dlse (optional, like lse)
  that of lse. Rows with lse = -inf contribute nothing. Float32 so that callers summing several
  contributions (ring attention) round once.
  """
  lay = _Layout(q, k, q_tokens, kv_tokens, mask, block_q, block_kv)
  q_blocks, dout_blocks = lay.q_rows(q), lay.q_rows(dout)
  # Padded query rows get lse = -inf: no contribution. [nq, batch, kv_heads, rows, 1]
  lse_blocks = _stat_rows(lse.astype(f32), lay.block_q, lay.kv_heads, -jnp.inf)
  delta_blocks = _stat_rows(tiles.delta(out, dout, dlse), lay.block_q, lay.kv_heads)

  def one_kv_block(dq, kv):
    kb, vb, kv_tok, live = kv
    kb, vb = kb.astype(f32), vb.astype(f32)

    def add_tile(i, carry):
      dq, dk, dv = carry
      qb, dob = q_blocks[i].astype(f32), dout_blocks[i].astype(f32)
      q_tok = jax.tree.map(lambda x: x[i], lay.q_tokens)

      def grads():
        p, ds = tiles.probs_and_dscores(qb, kb, vb, dob, lse_blocks[i], delta_blocks[i],
                                        _tile_mask(mask, q_tok, kv_tok), lay.scale)
        return tiles.dot_nn(ds, kb), tiles.dot_tn(ds, qb), tiles.dot_tn(p, dob)

      def nothing():
        return jnp.zeros_like(dq[i]), jnp.zeros_like(dk), jnp.zeros_like(dv)

      dq_tile, dk_tile, dv_tile = lax.cond(live[i], grads, nothing)
      return dq.at[i].add(dq_tile), dk + dk_tile, dv + dv_tile

    dq, dk, dv = lax.fori_loop(0, q_blocks.shape[0], add_tile, (dq, jnp.zeros_like(kb),
                                                                jnp.zeros_like(kb)))
    return dq, (dk, dv)

  dq0 = jnp.zeros_like(q_blocks, dtype=f32)
  kv_blocks = (lay.kv_rows(k), lay.kv_rows(v), lay.kv_tokens, lay.live.T)
  dq, (dk, dv) = lax.scan(one_kv_block, dq0, kv_blocks)
  q_seq, kv_seq = q.shape[1], k.shape[1]
  return (_from_rows(dq, lay.group)[:, :q_seq], _from_rows(dk, 1)[:, :kv_seq],
          _from_rows(dv, 1)[:, :kv_seq])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, q_tokens, kv_tokens, mask, block_q, block_kv):
  return blockwise_fwd(q, k, v, q_tokens, kv_tokens, mask=mask, block_q=block_q,
                       block_kv=block_kv)


def _attention_fwd(q, k, v, q_tokens, kv_tokens, mask, block_q, block_kv):
  out, lse = _attention(q, k, v, q_tokens, kv_tokens, mask, block_q, block_kv)
  return (out, lse), (q, k, v, q_tokens, kv_tokens, out, lse)


def _attention_bwd(mask, block_q, block_kv, residuals, cotangents):
  q, k, v, q_tokens, kv_tokens, out, lse = residuals
  dout, dlse = cotangents
  dq, dk, dv = blockwise_bwd(q, k, v, q_tokens, kv_tokens, out, lse, dout, mask=mask,
                             block_q=block_q, block_kv=block_kv, dlse=dlse)
  # The tokens are integers: no cotangent.
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_tokens: Tokens,
                        kv_tokens: Tokens, *, mask: Mask = Mask(), block_q: int = 512,
                        block_kv: int = 512) -> tuple[jax.Array, jax.Array]:
  """(out, lse) like `reference_attention`, differentiable in q, k, v through both outputs,
  with the blockwise backward (saves only q, k, v, tokens, out and lse)."""
  return _attention(q, k, v, q_tokens, kv_tokens, mask, block_q, block_kv)
