"""The Pallas SSD kernels (`ssd_pallas`): in-kernel tile math, the four kernels, their block
specs, and one launcher per kernel. Read `lcjax.kernels.ssd_pallas` first for what each kernel
computes and how the forward and backward passes are put together.

Stability: decay(j -> i) = exp(sum of a over (j, i]) is summed in the kernel as a masked
cumulative sum over the window only (as `ssd_chunked`'s `_segment_sum`), never as a difference of
prefix sums, so its error is relative to the window. Triton has `cumsum`; Mosaic has none on the
TensorCore, so on TPU it is log2(chunk) shifted adds (Hillis-Steele) of the same masked matrix:
each entry is again a sum of exactly its window's terms.

Layouts: x-like tiles are [chunk, head_dim], B/C tiles [chunk, d_state], states [head_dim,
d_state], per-position vectors [chunk, 1] columns in the kernels. On GPU the big arrays keep the
caller's [batch, seq, heads, ...] layout (strided loads) and vectors are stored as columns. Mosaic
wants the last two block dims (8, 128)-aligned or whole, and a column would take a 128-lane row
per position, so on TPU the big arrays are transposed to head-major [batch, heads, seq, ...]
around the kernels and vectors are stored as [1, chunk] rows, turned in the kernel. The
launchers take and return per-position vectors as [batch, heads, seq] float32 either way.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

f32 = jnp.float32


class Config(NamedTuple):
  """What the kernels are built for: static, so it is a custom_vjp nondiff argument."""

  chunk: int
  backend: str  # "gpu" or "tpu": which code path and compiler parameters
  interpret: object  # False, True, or pltpu.InterpretParams()

  @property
  def head_major(self):  # x, B, C, y as [batch, heads or groups, seq, ...]
    return self.backend == "tpu"

  @property
  def row_vectors(self):  # per-position vectors as lane-dense [1, chunk] rows, not columns
    return self.backend == "tpu"


# ---------------------------------------------------------------------------------------------
# In-kernel helpers: 2-D float32 tiles only, so the same code lowers to Triton and Mosaic.


def _dot(a, b, contract=(1, 0)):
  """a, b 2-D tiles contracted over axes `contract` ((1, 0): a @ b), float32 accumulation.

  float32 operands ask for full precision: Triton's default for them is TF32, ~1e-3 relative.
  """
  precision = lax.Precision.HIGHEST if a.dtype == f32 else None
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=f32)


def _cumsum(m, axis, backend):
  """Inclusive cumulative sum of a 2-D float32 tile along `axis`."""
  if backend != "tpu":
    return jnp.cumsum(m, axis=axis)
  # Hillis-Steele: after the step with shift s every entry holds the sum of the 2s entries
  # ending at it (fewer at the start). Only additions of window terms: no cancellation.
  index = lax.broadcasted_iota(jnp.int32, m.shape, axis)
  shift = 1
  while shift < m.shape[axis]:
    m = m + jnp.where(index >= shift, pltpu.roll(m, shift, axis), 0.0)
    shift *= 2
  return m


def _iotas(chunk):
  """Row and column indices of a [chunk, chunk] tile."""
  return (lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0),
          lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1))


def _column(v):
  """A per-position tile as a `[L, 1]` column: as read from a column block (GPU), or from a
  lane-dense `[1, L]` row (TPU) by keeping the diagonal of its broadcast (exact: one term each)."""
  if v.shape[1] == 1:
    return v
  i, j = _iotas(v.shape[1])
  return jnp.sum(jnp.where(i == j, v, 0.0), axis=1, keepdims=True)


def _store_column(ref, v):
  """Stores a `[L, 1]` column into a per-position block, a column or a `[1, L]` row."""
  if ref.shape[0] == 1:
    i, j = _iotas(ref.shape[1])
    v = jnp.sum(jnp.where(i == j, v, 0.0), axis=0, keepdims=True)
  ref[...] = v


def _decays(a, backend):
  """a `[L, 1]` log-decays (-inf at document starts) -> `[L(i), L(j)]` exp(sum of a over
  (j, i]) where i >= j, else 0. Row k of the masked matrix holds a_k in the columns j < k, so
  summing rows up to i gives each window (j, i] from its own terms only."""
  i, j = _iotas(a.shape[0])
  windows = _cumsum(jnp.where(i > j, a, 0.0), 0, backend)
  return jnp.where(i >= j, jnp.exp(windows), 0.0)


# ---------------------------------------------------------------------------------------------
# Kernels. One grid step is one (batch, chunk, head); shapes below are the tiles it sees.


def _state_kernel(x_ref, b_ref, dt_ref, a_suf_ref, state_ref):
  """x `[L, p]`, B `[L, n]`, dt and a_suf per position -> the chunk's own final state `[p, n]`."""
  x = x_ref[...]
  to_end = _column(dt_ref[...]) * jnp.exp(_column(a_suf_ref[...]))  # dt_j decay(j -> chunk end)
  x_to_end = (x.astype(f32) * to_end).astype(x.dtype)
  state_ref[...] = _dot(x_to_end, b_ref[...], (0, 0))


def _state_bwd_kernel(x_ref, b_ref, dt_ref, a_suf_ref, d_state_ref, dx_ref, db_ref,
                      dx_out_ref, db_out_ref, ddt_ref, da_suf_ref):
  """Kernel 1's backward, adding to kernel 2's dx `[L, p]` and per-head dB `[L, n]` (f32).

  d_state `[p, n]` f32 -> dx in x.dtype, dB f32, ddt and d a_suf per position f32.
  """
  x = x_ref[...]
  decay = jnp.exp(_column(a_suf_ref[...]))
  to_end = _column(dt_ref[...]) * decay
  x_to_end = (x.astype(f32) * to_end).astype(x.dtype)
  d_state = d_state_ref[...].astype(x.dtype)
  d_x_to_end = _dot(b_ref[...], d_state, (1, 1))  # [L, p]
  dx_out_ref[...] = (dx_ref[...] + d_x_to_end * to_end).astype(dx_out_ref.dtype)
  db_out_ref[...] = db_ref[...] + _dot(x_to_end, d_state)
  d_to_end = jnp.sum(d_x_to_end * x.astype(f32), axis=1, keepdims=True)
  _store_column(ddt_ref, d_to_end * decay)
  _store_column(da_suf_ref, d_to_end * to_end)


def _output_kernel(x_ref, b_ref, c_ref, dt_ref, a_ref, a_cum_ref, h_in_ref, y_ref, *, backend):
  """x `[L, p]`, B and C `[L, n]`, dt, a, a_cum per position, h_in `[p, n]` f32 -> y `[L, p]`."""
  x, B, C = x_ref[...], b_ref[...], c_ref[...]
  weights = _dot(C, B, (1, 1)) * _decays(_column(a_ref[...]), backend)  # [L(i), L(j)]
  x_dt = (x.astype(f32) * _column(dt_ref[...])).astype(x.dtype)
  y = _dot(weights.astype(x.dtype), x_dt)
  # The incoming state's share; exp(a_cum) is 0 from the first document start on.
  y_in = _dot(C, h_in_ref[...].astype(x.dtype), (1, 1))
  y_ref[...] = (y + jnp.exp(_column(a_cum_ref[...])) * y_in).astype(y_ref.dtype)


def _output_bwd_kernel(x_ref, b_ref, c_ref, dt_ref, a_ref, a_cum_ref, h_in_ref, dy_ref,
                       dx_ref, db_ref, dc_ref, ddt_ref, da_ref, da_cum_ref, dh_in_ref, *, backend):
  """Kernel 2's backward. dy `[L, p]` -> dx `[L, p]`, dB and dC `[L, n]` (this head's share),
  ddt and d a_cum per position, d a as a `[1, L]` row (it sums over rows of the tile), d h_in
  `[p, n]`; all float32."""
  x, B, C, dy = x_ref[...], b_ref[...], c_ref[...], dy_ref[...]
  cdt = x.dtype
  dt = _column(dt_ref[...])
  decays = _decays(_column(a_ref[...]), backend)
  weights = _dot(C, B, (1, 1)) * decays
  x_dt = (x.astype(f32) * dt).astype(cdt)

  d_weights = _dot(dy, x_dt, (1, 1))  # [L(i), L(j)]: dy_i . (dt_j x_j)
  d_x_dt = _dot(weights.astype(cdt), dy, (0, 0))  # [L(j), p]
  dx_ref[...] = d_x_dt * dt
  _store_column(ddt_ref, jnp.sum(d_x_dt * x.astype(f32), axis=1, keepdims=True))
  d_scores = (d_weights * decays).astype(cdt)

  # d log decay(j -> i) is d_weights * weights; each a_k sits in the windows (j, i] with
  # j < k <= i: an exclusive prefix sum over j, then a sum over rows i >= k.
  d_log_decay = d_weights * weights
  before_k = _cumsum(d_log_decay, 1, backend) - d_log_decay  # [i, k]: sum over j < k
  i, k = _iotas(x.shape[0])
  da_ref[...] = jnp.sum(jnp.where(i >= k, before_k, 0.0), axis=0, keepdims=True)

  from_start = jnp.exp(_column(a_cum_ref[...]))
  h_in = h_in_ref[...].astype(cdt)
  dy_in = (dy.astype(f32) * from_start).astype(cdt)
  dc_ref[...] = _dot(d_scores, B) + _dot(dy_in, h_in)
  db_ref[...] = _dot(d_scores, C, (0, 0))
  dh_in_ref[...] = _dot(dy_in, C, (0, 0))
  y_in = _dot(C, h_in, (1, 1))
  _store_column(da_cum_ref, from_start * jnp.sum(dy.astype(f32) * y_in, axis=1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# Block specs for grid step (b, c, h) and the pallas_call around them.


def _seq_spec(cfg, width, head_of=lambda h: h):
  """A [chunk, width] tile of a [b, s, k, width] array ([b, k, s, width] head-major), where
  k = head_of(h) indexes heads or groups."""
  if cfg.head_major:
    return pl.BlockSpec((None, None, cfg.chunk, width), lambda b, c, h: (b, head_of(h), c, 0))
  return pl.BlockSpec((None, cfg.chunk, None, width), lambda b, c, h: (b, c, head_of(h), 0))


def _group_spec(cfg, d_state, per_group):
  """The B or C tile head h reads: its group's, h // per_group. (lax.div, the same for h >= 0:
  jnp's floor division goes through `sign`, which Mosaic cannot lower away from a TPU.)"""
  return _seq_spec(cfg, d_state, lambda h: lax.div(h, per_group))


def _row_spec(cfg):
  """A [1, chunk] row of a per-position [b, h, 1, s] array."""
  return pl.BlockSpec((None, None, 1, cfg.chunk), lambda b, c, h: (b, h, 0, c))


def _vec_spec(cfg):
  """A per-position tile: a [1, chunk] row (TPU: a [chunk, 1] column would take a lane per
  position), else a [chunk, 1] column of a [b, h, s, 1] array."""
  if cfg.row_vectors:
    return _row_spec(cfg)
  return pl.BlockSpec((None, None, cfg.chunk, 1), lambda b, c, h: (b, h, c, 0))


def _vec(cfg, v):
  """[b, h, s] -> the array `_vec_spec` tiles."""
  return v[:, :, None, :] if cfg.row_vectors else v[..., None]


def _unvec(cfg, v):
  return v[:, :, 0, :] if cfg.row_vectors else v[..., 0]


def _vec_f32(cfg, batch, heads, seq):
  return jax.ShapeDtypeStruct((batch, heads, 1, seq) if cfg.row_vectors else
                              (batch, heads, seq, 1), f32)


def _state_spec(head_dim, d_state):
  """A [p, n] state of a per-chunk [c, b, h, p, n] array (chunk-major, as lax.scan wants it)."""
  return pl.BlockSpec((None, None, None, head_dim, d_state), lambda b, c, h: (c, b, h, 0, 0))


def _pallas_call(cfg, kernel, grid, in_specs, out_specs, out_shape, name, **kwargs):
  if cfg.backend == "gpu":
    # Untuned. The kernels hold whole [chunk, chunk] float32 tiles: 4 warps keep a few of them
    # in registers at chunk 64, 8 at 128; at 256 they spill whatever the count.
    num_warps = min(16, max(4, cfg.chunk * cfg.chunk // 2048))
    # Explicit Triton parameters also pick Triton: JAX's default Pallas GPU lowering is Mosaic GPU.
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=1)
  else:
    params = pltpu.CompilerParams(dimension_semantics=("parallel",) * len(grid))
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, compiler_params=params, interpret=cfg.interpret,
                        name=name, **kwargs)


def dims(x, B, cfg):
  """(batch, seq, heads, head_dim, groups, d_state) of kernel-layout x, B."""
  if cfg.head_major:
    (batch, heads, seq, head_dim), (groups, d_state) = x.shape, (B.shape[1], B.shape[3])
  else:
    (batch, seq, heads, head_dim), (groups, d_state) = x.shape, B.shape[2:]
  return batch, seq, heads, head_dim, groups, d_state


def chunk_states(cfg, x, B, dt, a_suf):
  """Kernel 1 over all chunks -> own states `[c, b, h, p, n]` f32."""
  batch, seq, heads, head_dim, groups, d_state = dims(x, B, cfg)
  n_chunks, per_group = seq // cfg.chunk, heads // groups
  return _pallas_call(
      cfg, _state_kernel, (batch, n_chunks, heads),
      in_specs=[_seq_spec(cfg, head_dim), _group_spec(cfg, d_state, per_group),
                _vec_spec(cfg), _vec_spec(cfg)],
      out_specs=_state_spec(head_dim, d_state),
      out_shape=jax.ShapeDtypeStruct((n_chunks, batch, heads, head_dim, d_state), f32),
      name="ssd_chunk_states")(x, B, _vec(cfg, dt), _vec(cfg, a_suf))


def chunk_outputs(cfg, x, B, C, dt, a, a_cum, states_in):
  """Kernel 2 over all chunks -> y in x's layout and dtype."""
  batch, seq, heads, head_dim, groups, d_state = dims(x, B, cfg)
  per_group = heads // groups
  group_spec = _group_spec(cfg, d_state, per_group)
  return _pallas_call(
      cfg, functools.partial(_output_kernel, backend=cfg.backend),
      (batch, seq // cfg.chunk, heads),
      in_specs=[_seq_spec(cfg, head_dim), group_spec, group_spec, _vec_spec(cfg), _vec_spec(cfg),
                _vec_spec(cfg), _state_spec(head_dim, d_state)],
      out_specs=_seq_spec(cfg, head_dim),
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      name="ssd_chunk_outputs")(
          x, B, C, _vec(cfg, dt), _vec(cfg, a), _vec(cfg, a_cum), states_in)



def chunk_outputs_bwd(cfg, x, B, C, dt, a, a_cum, states_in, dy):
  """Kernel 2's backward over all chunks -> (dx, per-head dB, per-head dC) in x's layout,
  (ddt, d a, d a_cum) `[b, h, s]`, and d states_in; all float32."""
  batch, seq, heads, head_dim, groups, d_state = dims(x, B, cfg)
  seq_f32 = lambda width: jax.ShapeDtypeStruct(x.shape[:3] + (width,), f32)  # per head
  vec_spec, vec_f32 = _vec_spec(cfg), _vec_f32(cfg, batch, heads, seq)
  group_spec = _group_spec(cfg, d_state, heads // groups)
  state_spec = _state_spec(head_dim, d_state)
  dx, db, dc, ddt, da, da_cum, dh_in = _pallas_call(
      cfg, functools.partial(_output_bwd_kernel, backend=cfg.backend),
      (batch, seq // cfg.chunk, heads),
      in_specs=[_seq_spec(cfg, head_dim), group_spec, group_spec, vec_spec, vec_spec, vec_spec,
                state_spec, _seq_spec(cfg, head_dim)],
      out_specs=[_seq_spec(cfg, head_dim), _seq_spec(cfg, d_state), _seq_spec(cfg, d_state),
                 vec_spec, _row_spec(cfg), vec_spec, state_spec],
      out_shape=[seq_f32(head_dim), seq_f32(d_state), seq_f32(d_state), vec_f32,
                 jax.ShapeDtypeStruct((batch, heads, 1, seq), f32), vec_f32,
                 jax.ShapeDtypeStruct(states_in.shape, f32)],
      name="ssd_chunk_outputs_bwd")(
          x, B, C, _vec(cfg, dt), _vec(cfg, a), _vec(cfg, a_cum), states_in, dy)
  return dx, db, dc, _unvec(cfg, ddt), da[:, :, 0, :], _unvec(cfg, da_cum), dh_in


def chunk_states_bwd(cfg, x, B, dt, a_suf, d_own_states, dx, db):
  """Kernel 1's backward over all chunks, adding to kernel 2's dx and per-head dB (float32,
  updated in place) -> (dx in x.dtype, dB per head, ddt, d a_suf `[b, h, s]` float32)."""
  batch, seq, heads, head_dim, groups, d_state = dims(x, B, cfg)
  vec_spec, vec_f32 = _vec_spec(cfg), _vec_f32(cfg, batch, heads, seq)
  dx, db, ddt, da_suf = _pallas_call(
      cfg, _state_bwd_kernel, (batch, seq // cfg.chunk, heads),
      in_specs=[_seq_spec(cfg, head_dim), _group_spec(cfg, d_state, heads // groups), vec_spec,
                vec_spec, _state_spec(head_dim, d_state), _seq_spec(cfg, head_dim),
                _seq_spec(cfg, d_state)],
      out_specs=[_seq_spec(cfg, head_dim), _seq_spec(cfg, d_state), vec_spec, vec_spec],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(db.shape, f32),
                 vec_f32, vec_f32],
      name="ssd_chunk_states_bwd", input_output_aliases={6: 1},  # dB accumulates in place
  )(x, B, _vec(cfg, dt), _vec(cfg, a_suf), d_own_states, dx, db)
  return dx, db, _unvec(cfg, ddt), _unvec(cfg, da_suf)
