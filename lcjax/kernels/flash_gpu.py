"""The flash attention kernels for GPU (Pallas Triton lowering); see `flash_attention.py`."""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from lcjax.kernels.flash_blocks import FIELDS, _Plan, read_block
from lcjax.kernels.tiles import (
  dot_nn,
  dot_tn,
  f32,
  pad_axis,
  probs_and_dscores,
  scores,
  softmax_finish,
  softmax_step,
)

# -- GPU frame (Triton): one program per (batch, head, block); loops over the other side ---------
# Arrays keep their [batch, seq, heads, head_dim] layout; BlockSpecs squeeze batch and head.


def _gpu_compiler_params(head_dim: int):
  return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _gpu_specs(plan: _Plan, head_dim: int):
  """BlockSpecs for the grid (batch, q heads, q blocks): a q block and whole kv rows."""
  bq, group = plan.block_q, plan.group
  return dict(
      q=pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0)),
      kv=pl.BlockSpec((None, plan.kv_pad, None, head_dim),
                      lambda b, h, i: (b, 0, lax.div(h, group), 0)),
      row_q=pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),  # lse, delta
      q_tok=pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
      kv_tok=pl.BlockSpec((None, plan.kv_pad), lambda b, h, i: (b, 0)),
      q_table=pl.BlockSpec((None, FIELDS, plan.nq), lambda b, h, i: (b, 0, 0)),
      kv_table=pl.BlockSpec((None, FIELDS, plan.nk), lambda b, h, i: (b, 0, 0)),
  )


def _gpu_loop_over_kv(plan: _Plan, q_table_ref, kv_table_ref, step, state):
  """Runs `step(kv_slice, state)` over the live kv blocks of this program's q block."""
  lo, hi, q_ranges = read_block(lambda f, i: q_table_ref[f, i], pl.program_id(2))

  def body(j, state):
    *_, kv_ranges = read_block(lambda f, j: kv_table_ref[f, j], j)
    kv_slice = pl.ds(pl.multiple_of(j * plan.block_kv, plan.block_kv), plan.block_kv)
    return lax.cond(plan.mask.live(q_ranges, kv_ranges), lambda s: step(kv_slice, s),
                    lambda s: s, state)

  return lax.fori_loop(lo, hi, body, state)


def _column(refs, at) -> list[jax.Array]:
  """Token refs (segment, index, position) -> their entries `at` as `[n, 1]` columns (q side)."""
  return [r[at][:, None] for r in refs]


def _row(refs, at) -> list[jax.Array]:
  """Token refs -> their entries `at` as `[1, n]` rows (kv side)."""
  return [r[at][None, :] for r in refs]


def _gpu_fwd_kernel(q_table_ref, kv_table_ref, q_ref, k_ref, v_ref, q_seg_ref, q_idx_ref,
                    q_pos_ref, kv_seg_ref, kv_idx_ref, kv_pos_ref, out_ref, lse_ref, *,
                    plan: _Plan):
  q = q_ref[...]
  q_tok = _column((q_seg_ref, q_idx_ref, q_pos_ref), slice(None))

  def step(kv, state):
    mask = plan.mask.visible(*q_tok, *_row((kv_seg_ref, kv_idx_ref, kv_pos_ref), kv))
    return softmax_step(scores(q, k_ref[kv, :], plan.scale, mask), v_ref[kv, :], *state)

  rows = q.shape[0]
  state = (jnp.full((rows, 1), -jnp.inf, f32), jnp.zeros((rows, 1), f32),
           jnp.zeros((rows, v_ref.shape[-1]), f32))
  out, lse = softmax_finish(*_gpu_loop_over_kv(plan, q_table_ref, kv_table_ref, step, state))
  out_ref[...] = out.astype(out_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _gpu_dq_kernel(q_table_ref, kv_table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                   q_seg_ref, q_idx_ref, q_pos_ref, kv_seg_ref, kv_idx_ref, kv_pos_ref, dq_ref, *,
                   plan: _Plan):
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  q_tok = _column((q_seg_ref, q_idx_ref, q_pos_ref), slice(None))

  def step(kv, dq):
    k = k_ref[kv, :]
    mask = plan.mask.visible(*q_tok, *_row((kv_seg_ref, kv_idx_ref, kv_pos_ref), kv))
    _, ds = probs_and_dscores(q, k, v_ref[kv, :], do, lse, delta, mask, plan.scale)
    return dq + dot_nn(ds, k)

  dq = _gpu_loop_over_kv(plan, q_table_ref, kv_table_ref, step, jnp.zeros(q.shape, f32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _gpu_dkv_kernel(q_table_ref, kv_table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                    q_seg_ref, q_idx_ref, q_pos_ref, kv_seg_ref, kv_idx_ref, kv_pos_ref, dk_ref,
                    dv_ref, *, plan: _Plan):
  """Grid (batch, kv heads, kv blocks); loops over the group's query heads, then q blocks."""
  k, v = k_ref[...], v_ref[...]
  kv_tok = _row((kv_seg_ref, kv_idx_ref, kv_pos_ref), slice(None))
  lo, hi, kv_ranges = read_block(lambda f, j: kv_table_ref[f, j], pl.program_id(2))
  bq = plan.block_q

  def q_block(g, i, carry):
    q_slice = pl.ds(pl.multiple_of(i * bq, bq), bq)
    q, do = q_ref[q_slice, g, :], do_ref[q_slice, g, :]
    lse, delta = lse_ref[g, q_slice][:, None], delta_ref[g, q_slice][:, None]
    mask = plan.mask.visible(*_column((q_seg_ref, q_idx_ref, q_pos_ref), q_slice), *kv_tok)
    p, ds = probs_and_dscores(q, k, v, do, lse, delta, mask, plan.scale)
    dk, dv = carry
    return dk + dot_tn(ds, q), dv + dot_tn(p, do)

  def body(g, i, carry):
    *_, q_ranges = read_block(lambda f, i: q_table_ref[f, i], i)
    return lax.cond(plan.mask.live(q_ranges, kv_ranges), lambda c: q_block(g, i, c),
                    lambda c: c, carry)

  def head(g, carry):
    return lax.fori_loop(lo, hi, lambda i, c: body(g, i, c), carry)

  zeros = jnp.zeros(k.shape, f32)
  dk, dv = lax.fori_loop(0, plan.group, head, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_pad_head(x: jax.Array) -> jax.Array:
  """Zero-pads head_dim to a power of two >= 16 (zeros add nothing to q.k and give 0 outputs)."""
  return pad_axis(x, 3, max(16, pl.next_power_of_2(x.shape[3])))


def _gpu_fwd(plan, q, k, v, q_tokens, kv_tokens, tables):
  batch, _, heads, _ = q.shape
  q = _gpu_pad_head(pad_axis(q, 1, plan.q_pad))
  k, v = (_gpu_pad_head(pad_axis(x, 1, plan.kv_pad)) for x in (k, v))
  d = q.shape[3]
  s = _gpu_specs(plan, d)
  out, lse = pl.pallas_call(
      functools.partial(_gpu_fwd_kernel, plan=plan),
      grid=(batch, heads, plan.nq),
      in_specs=[s["q_table"], s["kv_table"], s["q"], s["kv"], s["kv"], *[s["q_tok"]] * 3,
                *[s["kv_tok"]] * 3],
      out_specs=[s["q"], s["row_q"]],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, plan.q_pad), f32)],
      compiler_params=_gpu_compiler_params(d),
      interpret=plan.interpret,
      name="flash_fwd",
  )(*tables, q, k, v, *q_tokens, *kv_tokens)
  return out[:, :, :, :plan.head_dim], lse


def _gpu_bwd(plan, q, k, v, q_tokens, kv_tokens, tables, do, lse, delta):
  batch, _, heads, _ = q.shape
  kv_heads = k.shape[2]
  q, do = (_gpu_pad_head(x) for x in (q, do))
  k, v = (_gpu_pad_head(x) for x in (k, v))
  d = q.shape[3]
  s = _gpu_specs(plan, d)
  tokens = (*q_tokens, *kv_tokens)
  dq = pl.pallas_call(
      functools.partial(_gpu_dq_kernel, plan=plan),
      grid=(batch, heads, plan.nq),
      in_specs=[s["q_table"], s["kv_table"], s["q"], s["kv"], s["kv"], s["q"], s["row_q"],
                s["row_q"], *[s["q_tok"]] * 3, *[s["kv_tok"]] * 3],
      out_specs=s["q"],
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_gpu_compiler_params(d),
      interpret=plan.interpret,
      name="flash_bwd_dq",
  )(*tables, q, k, v, do, lse, delta, *tokens)

  # Grid (batch, kv heads, kv blocks): the whole q rows of the kv head's group of query heads.
  bk, group = plan.block_kv, plan.group
  kv_block = pl.BlockSpec((None, bk, None, d), lambda b, h, j: (b, j, h, 0))
  q_rows = pl.BlockSpec((None, plan.q_pad, group, d), lambda b, h, j: (b, 0, h, 0))
  row_stats = pl.BlockSpec((None, group, plan.q_pad), lambda b, h, j: (b, h, 0))
  q_tok = pl.BlockSpec((None, plan.q_pad), lambda b, h, j: (b, 0))
  kv_tok = pl.BlockSpec((None, bk), lambda b, h, j: (b, j))
  table = lambda n: pl.BlockSpec((None, FIELDS, n), lambda b, h, j: (b, 0, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_gpu_dkv_kernel, plan=plan),
      grid=(batch, kv_heads, plan.nk),
      in_specs=[table(plan.nq), table(plan.nk), q_rows, kv_block, kv_block, q_rows, row_stats,
                row_stats, q_tok, q_tok, q_tok, kv_tok, kv_tok, kv_tok],
      out_specs=[kv_block, kv_block],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
      compiler_params=_gpu_compiler_params(d),
      interpret=plan.interpret,
      name="flash_bwd_dkv",
  )(*tables, q, k, v, do, lse, delta, *tokens)
  return tuple(x[:, :, :, :plan.head_dim] for x in (dq, dk, dv))
