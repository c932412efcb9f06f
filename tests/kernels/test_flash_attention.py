"""Pallas flash attention, in Pallas's interpreter on CPU, against `reference_attention`.

Inputs are fresh every run (the `rng` fixture prints its seed). Each check takes out, lse and the
gradients w.r.t. q, k, v of random cotangents of both out and lse. Closeness is relative to the
largest magnitude of the expected array, max|actual - expected| / max|expected|. lse must be -inf
exactly where the reference's is. The GPU frame (Triton's) runs in every test. The TPU frame
(Mosaic's, with blocks of 128) runs in the TPU interpreter in the slow test, which also
catches reads of unwritten scratch. Neither compiles here: `test_lowers_for_gpu_and_tpu` runs
both lowerings, which catch unsupported ops and block shapes.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.kernels.attention import reference_attention
from lcjax.kernels.flash_attention import (
  flash_attention,
  flash_bwd,
  flash_fwd,
  supports,
)
from lcjax.kernels.flash_blocks import _schedule
from lcjax.kernels.mask import Mask, Tokens, row_tokens
from tests import numerics
from tests.numerics import BF16, F32, assert_close, positions_of

SMALL = dict(block_q=16, block_kv=16, backend="gpu", interpret=True)
random_qkv = functools.partial(numerics.random_qkv, head_dim=16)  # Triton's smallest


def short_documents(rng, batch, seq, max_len=7):
  """Rows of many documents of 1..max_len tokens (ids 1, 2, ...), then sometimes padding (0)."""
  rows = []
  for _ in range(batch):
    lengths = rng.integers(1, max_len + 1, size=seq)
    row = np.repeat(np.arange(1, seq + 1), lengths)[:seq]
    row[seq - rng.integers(0, seq // 4):] = 0
    rows.append(row)
  return np.stack(rows).astype(np.int32)


def document_tokens(segment_ids):
  return row_tokens(jnp.asarray(segment_ids), jnp.asarray(positions_of(segment_ids)))


@functools.partial(jax.jit, static_argnames=("fn", "kwargs"))
def run_with_grads(q, k, v, q_tokens, kv_tokens, dout, dlse, *, fn, kwargs):
  """(out, lse) and the VJP of (dout, dlse) w.r.t. q, k, v; kwargs a tuple of (name, value)."""
  outputs, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, q_tokens, kv_tokens, **dict(kwargs)),
                         q, k, v)
  return outputs, vjp((dout, dlse))


def compare(rng, q, k, v, q_tokens, kv_tokens, *, tol=F32, mask=Mask(), **flash_kwargs):
  """Flash vs the reference on the same inputs (the reference in float32): outputs, gradients."""
  batch, q_seq, heads, _ = q.shape
  dout = jnp.asarray(rng.standard_normal(q.shape), q.dtype)
  dlse = jnp.asarray(rng.standard_normal((batch, heads, q_seq)), jnp.float32)
  kwargs = tuple({**SMALL, **flash_kwargs, "mask": mask}.items())
  (out, lse), grads = run_with_grads(q, k, v, q_tokens, kv_tokens, dout, dlse,
                                     fn=flash_attention, kwargs=kwargs)
  as32 = lambda x: x.astype(jnp.float32)
  (want_out, want_lse), want_grads = run_with_grads(
      as32(q), as32(k), as32(v), q_tokens, kv_tokens, as32(dout), dlse,
      fn=reference_attention, kwargs=(("mask", mask),))
  assert out.dtype == q.dtype and lse.dtype == jnp.float32
  assert_close(out, want_out, tol, "out")
  assert_close(lse, want_lse, tol, "lse")
  for name, got, want in zip("qkv", grads, want_grads):
    assert got.dtype == q.dtype
    assert_close(got, want, tol, f"d{name}")
  return lse


@pytest.mark.parametrize("seq,heads,kv_heads", [
    (40, 2, 2), (37, 4, 1), pytest.param(48, 4, 2, marks=pytest.mark.slow)])
def test_causal(rng, seq, heads, kv_heads):
  """One document per row; seq not always a multiple of the block; GQA ratios 1, 2, 4."""
  q, k, v = random_qkv(rng, 2, seq, seq, heads, kv_heads)
  tokens = row_tokens(jnp.ones((2, seq), jnp.int32))
  compare(rng, q, k, v, tokens, tokens)


@pytest.mark.parametrize("window,sinks", [
    (None, 0), (6, 2), pytest.param(5, 0, marks=pytest.mark.slow)])
def test_short_documents(rng, window, sinks):
  """Many short documents and padding, with a window, with sinks by in-document position."""
  q, k, v = random_qkv(rng, 2, 45, 45, 4, 2)
  tokens = document_tokens(short_documents(rng, 2, 45))
  compare(rng, q, k, v, tokens, tokens, mask=Mask(window, sinks))


def test_long_documents_window_and_sinks(rng):
  """Window smaller than a block and sinks in another: live blocks with dead ones between."""
  q, k, v = random_qkv(rng, 1, 64, 64, 2, 1)
  segment_ids = np.array([[1] * 50 + [2] * 14], np.int32)
  tokens = document_tokens(segment_ids)
  compare(rng, q, k, v, tokens, tokens, mask=Mask(window=9, sinks=3))


def test_permuted_token_order(rng):
  """Rows stored in a random order: the mask follows the tokens, not their places."""
  seq = 48
  segment_ids = short_documents(rng, 2, seq, max_len=20)
  tokens = document_tokens(segment_ids)
  perm = np.stack([rng.permutation(seq) for _ in range(2)])
  permuted = Tokens(*(np.take_along_axis(np.asarray(x), perm, axis=1) for x in tokens))
  q, k, v = random_qkv(rng, 2, seq, seq, 4, 2)  # data for the permuted places directly
  compare(rng, q, k, v, permuted, permuted, mask=Mask(window=7, sinks=2))


def test_queries_that_see_nothing(rng):
  """A kv block of a later part of the row (as in ring attention): the first q blocks see no
  key at all (lse -inf, out 0, no gradient), others see some; q and kv lengths differ."""
  q, k, v = random_qkv(rng, 2, 40, 24, 2, 1)
  q_tokens = row_tokens(jnp.ones((2, 40), jnp.int32))
  kv_tokens = q_tokens._replace(index=q_tokens.index[:, :24] + 20,
                                segment_ids=q_tokens.segment_ids[:, :24],
                                positions=q_tokens.positions[:, :24] + 20)
  lse = compare(rng, q, k, v, q_tokens, kv_tokens, mask=Mask(window=8))
  assert np.all(np.isneginf(lse[:, :, :20])) and np.all(np.isfinite(lse[:, :, 20:]))


def test_bfloat16(rng):
  q, k, v = random_qkv(rng, 2, 40, 40, 4, 2, dtype=jnp.bfloat16)
  tokens = document_tokens(short_documents(rng, 2, 40, max_len=15))
  compare(rng, q, k, v, tokens, tokens, mask=Mask(window=6, sinks=1), tol=BF16)


def test_dead_blocks_are_skipped(rng):
  """NaN keys and values in the blocks a q block does not need: between its sinks and its
  window (block 1), and after the diagonal (block 4). It must never read them.

  Visiting a masked block would leak the NaN (0 * NaN in P @ V), so out, lse and dq of that q
  block (rows 48..63) stay finite and right only if both blocks are skipped.
  """
  q, k, v = random_qkv(rng, 1, 80, 80, 2, 2)
  tokens = row_tokens(jnp.ones((1, 80), jnp.int32))
  poison = lambda x: x.at[:, 16:32].set(jnp.nan).at[:, 64:].set(jnp.nan)
  dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  dlse = jnp.asarray(rng.standard_normal((1, 2, 80)), jnp.float32)
  mask = (("mask", Mask(window=9, sinks=3)),)
  (out, lse), (dq, _, _) = run_with_grads(q, poison(k), poison(v), tokens, tokens, dout, dlse,
                                          fn=flash_attention, kwargs=tuple(SMALL.items()) + mask)
  (want_out, want_lse), (want_dq, _, _) = run_with_grads(q, k, v, tokens, tokens, dout, dlse,
                                                         fn=reference_attention, kwargs=mask)
  rows = slice(48, 64)
  assert_close(out[:, rows], want_out[:, rows], F32, "out")
  assert_close(lse[:, :, rows], want_lse[:, :, rows], F32, "lse")
  assert_close(dq[:, rows], want_dq[:, rows], F32, "dq")


@pytest.mark.parametrize("window", [None, 20])
def test_loops_span_exactly_the_needed_blocks(window):
  """Causal rows: each q block's kv loop runs from the first to the last block its mask
  touches (stopping at the diagonal, starting at the window), and each kv block's q loop too."""
  seq, block, n = 64, 16, 4
  tokens = row_tokens(jnp.ones((1, seq), jnp.int32))
  q_table, kv_table = _schedule(tokens, tokens, seq, seq, block, block, Mask(window))
  needed = np.asarray(Mask(window).dense(tokens, tokens))[0]
  needed = needed.reshape(n, block, n, block).any(axis=(1, 3))  # [q block, kv block]
  for table, rows in ((q_table, needed), (kv_table, needed.T)):
    for i, row in enumerate(rows):
      live = np.flatnonzero(row)
      assert tuple(table[0, :2, i]) == (live[0], live[-1] + 1), (i, row)


def test_backward_with_global_lse(rng):
  """Split the keys in two halves (as ring attention does), merge the forwards by their lse,
  and run flash_bwd per half with the merged out and lse: the halves' gradients make up the
  gradient of attention over all keys, for both cotangents (of out and of lse)."""
  seq, half = 48, 24
  q, k, v = random_qkv(rng, 2, seq, seq, 4, 2)
  tokens = document_tokens(short_documents(rng, 2, seq, max_len=30))
  mask = dict(mask=Mask(window=13, sinks=2))
  halves = [Tokens(*(x[:, s] for x in tokens)) for s in (slice(0, half), slice(half, seq))]
  dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  dlse = jnp.asarray(rng.standard_normal((2, 4, seq)), jnp.float32)

  @jax.jit
  def by_halves(q, k, v, tokens, halves, dout, dlse):
    kv = [(k[:, :half], v[:, :half]), (k[:, half:], v[:, half:])]
    parts = [flash_fwd(q, k_, v_, tokens, t, **mask, **SMALL) for (k_, v_), t in zip(kv, halves)]
    lse = jnp.logaddexp(parts[0][1], parts[1][1])
    weight = lambda part_lse: jnp.where(jnp.isneginf(lse), 0.0, jnp.exp(part_lse - lse))
    out = sum(o * weight(l).swapaxes(1, 2)[..., None] for o, l in parts)
    grads = [flash_bwd(q, k_, v_, tokens, t, out, lse, dout, dlse=dlse, **mask, **SMALL)
             for (k_, v_), t in zip(kv, halves)]
    return out, lse, grads

  out, lse, grads = by_halves(q, k, v, tokens, halves, dout, dlse)
  (want_out, want_lse), (want_dq, want_dk, want_dv) = run_with_grads(
      q, k, v, tokens, tokens, dout, dlse, fn=reference_attention,
      kwargs=tuple(mask.items()))
  assert_close(out, want_out, F32, "merged out")
  assert_close(lse, want_lse, F32, "merged lse")
  assert_close(grads[0][0] + grads[1][0], want_dq, F32, "dq")
  assert_close(jnp.concatenate([grads[0][1], grads[1][1]], 1), want_dk, F32, "dk")
  assert_close(jnp.concatenate([grads[0][2], grads[1][2]], 1), want_dv, F32, "dv")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["documents", "later_keys"])
def test_tpu_frame_in_tpu_interpreter(rng, case):
  """backend="tpu": the 4-d grid with VMEM scratch and index maps clamped to the live spans,
  blocks of 128, in the TPU interpreter (unwritten memory reads as NaN there, so a missed init
  shows). "later_keys": as in ring attention; the first q block sees no key at all."""
  seq = 150  # two blocks each side, the second partly padding
  if case == "documents":
    q, k, v = random_qkv(rng, 1, seq, seq, 2, 1, head_dim=32)
    q_tokens = kv_tokens = document_tokens(short_documents(rng, 1, seq, max_len=60))
    mask = Mask(window=40, sinks=2)
  else:
    q, k, v = random_qkv(rng, 1, seq, 140, 4, 2, head_dim=32)
    q_tokens = row_tokens(jnp.ones((1, seq), jnp.int32))
    kv_tokens = Tokens(*(x[:, :140] + offset for x, offset in zip(q_tokens, (0, 130, 130))))
    mask = Mask()
  compare(rng, q, k, v, q_tokens, kv_tokens, mask=mask, block_q=128, block_kv=128, backend="tpu")


@pytest.mark.parametrize("platform,backend", [("cuda", "gpu"), ("tpu", "tpu")])
def test_lowers_for_gpu_and_tpu(platform, backend):
  """Forward and backward lower to Triton / Mosaic at model sizes (no compile: no device)."""
  batch, seq, heads, kv_heads, head_dim = 1, 1000, 8, 2, 128
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)

  def loss(q, k, v, segment_ids):
    tokens = row_tokens(segment_ids)
    out, lse = flash_attention(q, k, v, tokens, tokens, mask=Mask(window=256, sinks=4),
                               backend=backend)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

  args = (shape(batch, seq, heads, head_dim), shape(batch, seq, kv_heads, head_dim),
          shape(batch, seq, kv_heads, head_dim), shape(batch, seq, dtype=jnp.int32))
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
      lowering_platforms=(platform,)).as_text()
  for name in ("flash_fwd", "flash_bwd_dq", "flash_bwd_dkv"):
    assert name in text, name


def test_supports():
  q = jnp.zeros((1, 8, 4, 64), jnp.bfloat16)
  kv = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
  assert supports(q, kv, kv, backend="gpu") is None
  assert supports(q, kv, kv, backend="tpu") is None
  assert "powers of two" in supports(q, kv, kv, backend="gpu", block_q=48)
  assert "128" in supports(q, kv, kv, backend="tpu", block_kv=64)
  assert "multiple of kv_heads" in supports(q, jnp.zeros((1, 8, 3, 64)), jnp.zeros((1, 8, 3, 64)))
  assert "dtypes" in supports(q, kv.astype(jnp.float32), kv, backend="gpu")
  with pytest.raises(ValueError, match="powers of two"):
    flash_fwd(q, kv, kv, row_tokens(jnp.ones((1, 8), jnp.int32)),
              row_tokens(jnp.ones((1, 8), jnp.int32)), block_q=48, backend="gpu", interpret=True)
