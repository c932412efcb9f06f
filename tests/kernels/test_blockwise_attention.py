"""Blockwise attention against `reference_attention`: forward, gradients, partial backward.

Inputs are fresh every run (the `rng` fixture prints its seed). Block sizes are small and do not
divide the lengths, so every test crosses block edges and padding.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.kernels.attention import reference_attention
from lcjax.kernels.blockwise_attention import blockwise_attention, blockwise_bwd, blockwise_fwd
from lcjax.kernels.mask import Mask, Tokens, block_ranges, row_tokens
from tests.numerics import BF16, F32, assert_close, positions_of, random_qkv, random_segments


def random_tokens(rng, batch, seq):
  """Rows of 1-4 documents, sometimes followed by padding (id 0)."""
  seg = random_segments(rng, batch, seq)
  return row_tokens(jnp.asarray(seg), jnp.asarray(positions_of(seg)))


def both(q, k, v, q_tokens, kv_tokens, dout, dlse, *, mask, block_q, block_kv):
  """(out, lse, dq, dk, dv) of blockwise and of reference attention, for cotangents dout and
  dlse of out and lse."""
  def run(fn):
    (out, lse), vjp = jax.vjp(
        lambda q, k, v: fn(q, k, v, q_tokens, kv_tokens, mask=mask), q, k, v)
    return (out, lse, *vjp((dout.astype(out.dtype), dlse)))

  blockwise = functools.partial(blockwise_attention, block_q=block_q, block_kv=block_kv)
  return jax.jit(run, static_argnums=0)(blockwise), jax.jit(run, static_argnums=0)(
      reference_attention)


CASES = [  # heads, kv_heads, window, sinks, block_q, block_kv
    (4, 2, None, 0, 8, 16),
    (4, 2, 6, 3, 16, 8),
    (2, 2, 1, 0, 5, 3),  # window 1: each token sees only itself
    (6, 2, 9, 0, 512, 512),  # blocks longer than the sequence: one tile
]


@pytest.mark.parametrize("heads,kv_heads,window,sinks,block_q,block_kv", CASES)
def test_matches_reference(rng, heads, kv_heads, window, sinks, block_q, block_kv):
  q, k, v = random_qkv(rng, heads=heads, kv_heads=kv_heads)
  tokens = random_tokens(rng, 2, 37)
  dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  dlse = jnp.asarray(rng.standard_normal((2, heads, 37)), jnp.float32)
  got, want = both(q, k, v, tokens, tokens, dout, dlse, mask=Mask(window, sinks),
                   block_q=block_q, block_kv=block_kv)
  for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
    assert_close(g, w, F32, f"{name} (segment_ids={tokens.segment_ids})")


def test_queries_after_the_keys(rng):
  """Different lengths: 13 queries that continue 29 keys (as in chunked prefill), plus 3 rows
  that see nothing (before every key): those give out 0, lse -inf and no gradient."""
  q, k, v = random_qkv(rng, q_seq=16, kv_seq=29)
  seg = np.ones((2, 29), np.int32)
  kv_tokens = row_tokens(jnp.asarray(seg))
  index = jnp.broadcast_to(jnp.concatenate([jnp.arange(-3, 0), jnp.arange(16, 29)]), (2, 16))
  q_tokens = Tokens(jnp.ones((2, 16), jnp.int32), index, index)
  dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  dlse = jnp.zeros((2, 4, 16), jnp.float32)
  got, want = both(q, k, v, q_tokens, kv_tokens, dout, dlse, mask=Mask(), block_q=4,
                   block_kv=8)
  for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
    assert_close(g, w, F32, name)
  out, lse, dq = got[:3]
  np.testing.assert_array_equal(out[:, :3], 0.0)
  assert np.all(np.isneginf(lse[..., :3]))
  np.testing.assert_array_equal(dq[:, :3], 0.0)


def test_backward_of_a_part_with_the_global_out_and_lse(rng):
  """What ring attention relies on: blockwise_bwd over a part of the keys, given the out and
  lse of attention over all of them, returns that part's share of dq and its full dk, dv.

  A part is all keys with those outside it hidden by a segment id no query has (same shapes
  for both parts, so one compilation)."""
  q, k, v = random_qkv(rng)
  tokens = random_tokens(rng, 2, 37)
  mask = Mask(window=7, sinks=2)
  dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  dlse = jnp.asarray(rng.standard_normal((2, 4, 37)), jnp.float32)
  ref = functools.partial(reference_attention, q_tokens=tokens, kv_tokens=tokens, mask=mask)
  (out, lse), vjp = jax.vjp(jax.jit(lambda q, k, v: ref(q, k, v)), q, k, v)
  dq, dk, dv = vjp((dout, dlse))
  cut = int(rng.integers(1, 36))
  first = jnp.arange(37) < cut
  bwd = jax.jit(functools.partial(blockwise_bwd, mask=mask, block_q=8, block_kv=8))
  parts = [bwd(q, k, v, tokens, tokens._replace(segment_ids=jnp.where(keep, tokens.segment_ids,
                                                                      -3)),
               out, lse, dout, dlse=dlse) for keep in (first, ~first)]
  assert_close(parts[0][0] + parts[1][0], dq, F32, f"dq (cut={cut})")
  for i, (name, want) in enumerate((("dk", dk), ("dv", dv)), start=1):
    assert_close(jnp.where(first[:, None, None], parts[0][i], parts[1][i]), want, F32, name)
    np.testing.assert_array_equal(parts[0][i][:, cut:], 0.0)


def test_bfloat16(rng):
  q, k, v = random_qkv(rng, dtype=jnp.bfloat16)
  tokens = random_tokens(rng, 2, 37)
  dout = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16)
  dlse = jnp.zeros((2, 4, 37), jnp.float32)
  got, want = both(q, k, v, tokens, tokens, dout, dlse, mask=Mask(window=5, sinks=1), block_q=8,
                   block_kv=8)
  assert got[0].dtype == jnp.bfloat16 and got[2].dtype == jnp.bfloat16
  for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
    assert_close(g, w, BF16, name)


def test_forward_out_dtype(rng):
  q, k, v = random_qkv(rng, dtype=jnp.bfloat16)
  tokens = random_tokens(rng, 2, 37)
  out, lse = blockwise_fwd(q, k, v, tokens, tokens, block_q=8, block_kv=8, out_dtype=jnp.float32)
  assert out.dtype == jnp.float32 and lse.dtype == jnp.float32


def test_scores_are_never_materialised():
  """XLA's scratch memory for forward + backward stays far below one `[seq, seq]` score matrix
  (the reference needs several)."""
  batch, seq, heads = 1, 1024, 2
  q = jnp.zeros((batch, seq, heads, 8))
  kv = jnp.zeros((batch, seq, 1, 8))
  tokens = row_tokens(jnp.ones((batch, seq), jnp.int32))

  def loss(q, k, v):
    return jnp.sum(blockwise_attention(q, k, v, tokens, tokens, block_q=64, block_kv=64)[0])

  memory = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, kv, kv).compile().memory_analysis()
  if memory is None:
    pytest.skip("this backend reports no memory analysis")
  scores_bytes = batch * heads * seq * seq * 4
  assert memory.temp_size_in_bytes < scores_bytes / 4, memory.temp_size_in_bytes


def test_live_on_block_ranges():
  """`Mask.live` on the ranges of two blocks: False only when no pair can be visible."""
  def ranges(index, positions=None, segments=None):
    index = jnp.asarray([index], jnp.int32)
    tokens = Tokens(jnp.ones_like(index) if segments is None else jnp.asarray([segments]),
                    index, index if positions is None else jnp.asarray([positions], jnp.int32))
    return block_ranges(tokens, index.shape[1])

  def masked(q, kv, mask):
    return not bool(mask.live_pairs(q, kv).any())

  q = ranges([8, 9, 10, 11])
  assert masked(q, ranges([12, 13]), Mask())  # all keys later
  assert not masked(q, ranges([11, 12]), Mask())
  assert not masked(q, ranges([0, 1]), Mask())
  assert masked(q, ranges([0, 1]), Mask(window=7))  # 8 - 1 >= 7: all out of window
  assert not masked(q, ranges([0, 2]), Mask(window=7))
  assert not masked(q, ranges([0, 1]), Mask(window=7, sinks=1))  # position 0 is a sink
  assert masked(q, ranges([0, 1], positions=[5, 6]), Mask(window=7, sinks=1))
  assert masked(q, ranges([0, 1], segments=[2, 3]), Mask())  # other documents


def test_fully_masked_tiles_are_skipped(rng):
  """NaN values in the last kv block reach only the queries of the last query block: the other
  tiles of that kv block are not computed (computed, 0 * NaN would spread the NaN)."""
  q, k, v = random_qkv(rng, q_seq=32)
  tokens = row_tokens(jnp.ones((2, 32), jnp.int32))
  out, _ = jax.jit(functools.partial(blockwise_fwd, block_q=8, block_kv=8))(
      q, k, v.at[:, 24:].set(jnp.nan), tokens, tokens)
  want, _ = reference_attention(q, k, v, tokens, tokens)
  assert_close(out[:, :24], want[:, :24], F32, "out before the NaN block")
  assert np.all(np.isnan(out[:, 24:]))
