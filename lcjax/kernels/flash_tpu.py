"""The flash attention kernels for TPU (Pallas Mosaic lowering); see `flash_attention.py`."""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lcjax.kernels.flash_blocks import (
  FIELDS,
  NUM_LANES,
  NUM_SUBLANES,
  SPAN_HI,
  SPAN_LO,
  _Plan,
  read_block,
)
from lcjax.kernels.mask import Tokens
from lcjax.kernels import tiles
from lcjax.kernels.tiles import f32

# -- TPU frame (Mosaic): grid (..., q blocks, kv blocks), state in VMEM scratch ------------------
# Arrays are [batch, heads, seq, head_dim]; q tokens [batch, seq, 128] (lanes), kv tokens
# [batch, 8, seq] (sublanes), row statistics [batch, heads, seq, 128]. The schedule tables are
# scalar-prefetched (SMEM), flattened: field f of block j of row b is at (b * 7 + f) * n + j.


def _tpu_reader(table_ref, b, n):
  return lambda f, j: table_ref[(b * FIELDS + f) * n + j]


def _clamp(j, lo, hi):
  """Block j, clamped to the live span [lo, hi): dead steps revisit a block, so no DMA."""
  return jnp.maximum(jnp.minimum(j, hi - 1), lo)


def _tpu_mask(plan, q_seg_ref, q_idx_ref, q_pos_ref, kv_seg_ref, kv_idx_ref, kv_pos_ref):
  """The tile's mask: q tokens replicated over lanes, widened to the kv block; kv tokens from
  their first sublane."""
  bk = kv_seg_ref.shape[1]
  q_tok = (tiles.widen(r[...], bk) for r in (q_seg_ref, q_idx_ref, q_pos_ref))
  return plan.mask.visible(*q_tok, *(r[:1, :] for r in (kv_seg_ref, kv_idx_ref, kv_pos_ref)))


def _tpu_q_major_specs(plan: _Plan, head_dim: int):
  """BlockSpecs for grid (batch, q heads, q blocks, kv blocks) + 2 prefetched tables."""
  bq, bk, nq, group = plan.block_q, plan.block_kv, plan.nq, plan.group

  def kv_block(b, i, j, q_table):
    read = _tpu_reader(q_table, b, nq)
    return _clamp(j, read(SPAN_LO, i), read(SPAN_HI, i))

  return dict(
      q=pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, *_: (b, h, i, 0)),
      kv=pl.BlockSpec((None, None, bk, head_dim),
                      lambda b, h, i, j, qt, kt: (b, lax.div(h, group), kv_block(b, i, j, qt), 0)),
      row_q=pl.BlockSpec((None, None, bq, NUM_LANES), lambda b, h, i, j, *_: (b, h, i, 0)),
      q_tok=pl.BlockSpec((None, bq, NUM_LANES), lambda b, h, i, j, *_: (b, i, 0)),
      kv_tok=pl.BlockSpec((None, NUM_SUBLANES, bk),
                          lambda b, h, i, j, qt, kt: (b, 0, kv_block(b, i, j, qt))),
  )


def _tpu_call(kernel, plan, grid, in_specs, out_specs, out_shape, scratch, sequential, name):
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=grid, in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=(pltpu.PARALLEL,) * (len(grid) - sequential)
          + (pltpu.ARBITRARY,) * sequential),
      interpret=plan.interpret,
      name=name,
  )


def _tpu_live(plan, q_table_ref, kv_table_ref, b, i, j):
  *_, q_ranges = read_block(_tpu_reader(q_table_ref, b, plan.nq), i)
  *_, kv_ranges = read_block(_tpu_reader(kv_table_ref, b, plan.nk), j)
  return plan.mask.live(q_ranges, kv_ranges)


def _tpu_fwd_kernel(q_table_ref, kv_table_ref, q_ref, k_ref, v_ref, *refs, plan: _Plan):
  *tokens, out_ref, lse_ref, m_ref, l_ref, acc_ref = refs  # 6 token refs (`_tpu_mask`)
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, f32)
    l_ref[...] = jnp.zeros(l_ref.shape, f32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, f32)

  @pl.when(_tpu_live(plan, q_table_ref, kv_table_ref, b, i, j))
  def _():
    mask = _tpu_mask(plan, *tokens)
    s = tiles.scores(q_ref[...], k_ref[...], plan.scale, mask)
    state = tiles.softmax_step(s, v_ref[...], m_ref[...], l_ref[...], acc_ref[...])
    m_ref[...], l_ref[...], acc_ref[...] = state

  @pl.when(j == plan.nk - 1)
  def _():
    out, lse = tiles.softmax_finish(m_ref[...], l_ref[...], acc_ref[...])
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = lse


def _tpu_dq_kernel(q_table_ref, kv_table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                   *refs, plan: _Plan):
  *tokens, dq_ref, dq_acc_ref = refs
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, f32)

  @pl.when(_tpu_live(plan, q_table_ref, kv_table_ref, b, i, j))
  def _():
    mask = _tpu_mask(plan, *tokens)
    k = k_ref[...]
    _, ds = tiles.probs_and_dscores(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...],
                                    delta_ref[...], mask, plan.scale)
    dq_acc_ref[...] += tiles.dot_nn(ds, k)

  @pl.when(j == plan.nk - 1)
  def _():
    dq_ref[...] = dq_acc_ref[...].astype(dq_ref.dtype)


def _tpu_dkv_kernel(q_table_ref, kv_table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                    *refs, plan: _Plan):
  """Grid (batch, kv heads, kv blocks, group, q blocks): sums over the group's query heads."""
  *tokens, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = refs
  b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((g == 0) & (i == 0))
  def _():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, f32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, f32)

  @pl.when(_tpu_live(plan, q_table_ref, kv_table_ref, b, i, j))
  def _():
    mask = _tpu_mask(plan, *tokens)
    q, do = q_ref[...], do_ref[...]
    p, ds = tiles.probs_and_dscores(q, k_ref[...], v_ref[...], do, lse_ref[...],
                                    delta_ref[...], mask, plan.scale)
    dk_acc_ref[...] += tiles.dot_tn(ds, q)
    dv_acc_ref[...] += tiles.dot_tn(p, do)

  @pl.when((g == plan.group - 1) & (i == plan.nq - 1))
  def _():
    dk_ref[...] = dk_acc_ref[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _tpu_tokens(q_tokens: Tokens, kv_tokens: Tokens):
  """q tokens broadcast over lanes [batch, seq, 128]; kv tokens over sublanes."""
  lanes = lambda x: jnp.broadcast_to(x[:, :, None], (*x.shape, NUM_LANES))
  sublanes = lambda x: jnp.broadcast_to(x[:, None, :], (x.shape[0], NUM_SUBLANES, x.shape[1]))
  return (*map(lanes, q_tokens), *map(sublanes, kv_tokens))


def _tpu_rows(x: jax.Array) -> jax.Array:
  """[batch, heads, seq] -> [batch, heads, seq, 128] float32, replicated over lanes."""
  return jnp.broadcast_to(x.astype(f32)[..., None], (*x.shape, NUM_LANES))


def _tpu_fwd(plan, q, k, v, q_tokens, kv_tokens, tables):
  batch, _, heads, d = q.shape
  q = tiles.pad_axis(q, 1, plan.q_pad).swapaxes(1, 2)
  k, v = (tiles.pad_axis(x, 1, plan.kv_pad).swapaxes(1, 2) for x in (k, v))
  s = _tpu_q_major_specs(plan, d)
  out, lse = _tpu_call(
      functools.partial(_tpu_fwd_kernel, plan=plan), plan, (batch, heads, plan.nq, plan.nk),
      [s["q"], s["kv"], s["kv"], *[s["q_tok"]] * 3, *[s["kv_tok"]] * 3],
      [s["q"], s["row_q"]],
      [jax.ShapeDtypeStruct(q.shape, q.dtype),
       jax.ShapeDtypeStruct((batch, heads, plan.q_pad, NUM_LANES), f32)],
      [pltpu.VMEM((plan.block_q, NUM_LANES), f32), pltpu.VMEM((plan.block_q, NUM_LANES), f32),
       pltpu.VMEM((plan.block_q, d), f32)],
      sequential=1, name="flash_fwd",
  )(*(t.reshape(-1) for t in tables), q, k, v, *_tpu_tokens(q_tokens, kv_tokens))
  return out.swapaxes(1, 2), lse[..., 0]


def _tpu_bwd(plan, q, k, v, q_tokens, kv_tokens, tables, do, lse, delta):
  batch, _, heads, d = q.shape
  kv_heads = k.shape[2]
  q, do, k, v = (x.swapaxes(1, 2) for x in (q, do, k, v))
  lse, delta = _tpu_rows(lse), _tpu_rows(delta)
  tokens = _tpu_tokens(q_tokens, kv_tokens)
  flat_tables = [t.reshape(-1) for t in tables]
  s = _tpu_q_major_specs(plan, d)
  dq = _tpu_call(
      functools.partial(_tpu_dq_kernel, plan=plan), plan, (batch, heads, plan.nq, plan.nk),
      [s["q"], s["kv"], s["kv"], s["q"], s["row_q"], s["row_q"], *[s["q_tok"]] * 3,
       *[s["kv_tok"]] * 3],
      s["q"], jax.ShapeDtypeStruct(q.shape, q.dtype), [pltpu.VMEM((plan.block_q, d), f32)],
      sequential=1, name="flash_bwd_dq",
  )(*flat_tables, q, k, v, do, lse, delta, *tokens)

  # Grid (batch, kv heads, kv blocks, group, q blocks); q blocks clamp to the kv block's span.
  bq, bk, nk, group = plan.block_q, plan.block_kv, plan.nk, plan.group

  def q_block(b, j, i, kv_table):
    read = _tpu_reader(kv_table, b, nk)
    return _clamp(i, read(SPAN_LO, j), read(SPAN_HI, j))

  q_spec = pl.BlockSpec((None, None, bq, d),
                        lambda b, h, j, g, i, qt, kt: (b, h * group + g, q_block(b, j, i, kt), 0))
  rows = pl.BlockSpec((None, None, bq, NUM_LANES),
                      lambda b, h, j, g, i, qt, kt: (b, h * group + g, q_block(b, j, i, kt), 0))
  q_tok = pl.BlockSpec((None, bq, NUM_LANES),
                       lambda b, h, j, g, i, qt, kt: (b, q_block(b, j, i, kt), 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b, h, j, *_: (b, h, j, 0))
  kv_tok = pl.BlockSpec((None, NUM_SUBLANES, bk), lambda b, h, j, *_: (b, 0, j))
  dk, dv = _tpu_call(
      functools.partial(_tpu_dkv_kernel, plan=plan), plan,
      (batch, kv_heads, nk, group, plan.nq),
      [q_spec, kv_spec, kv_spec, q_spec, rows, rows, *[q_tok] * 3, *[kv_tok] * 3],
      [kv_spec, kv_spec], [jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
      [pltpu.VMEM((bk, d), f32), pltpu.VMEM((bk, d), f32)],
      sequential=2, name="flash_bwd_dkv",
  )(*flat_tables, q, k, v, do, lse, delta, *tokens)
  return dq.swapaxes(1, 2), dk.swapaxes(1, 2), dv.swapaxes(1, 2)
