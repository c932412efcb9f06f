"""Flash attention in Pallas (forward and backward) for the mask shared with `attention.py`.

The kernels build the mask from the token arrays (segment id, causal index, in-document position),
so any token order works: ring attention's blocks, permuted (zigzag, striped) layouts. The
softmax runs online in float32; lse and "queries seeing nothing" follow the `attention.py`
contract.

Work is skipped per (q block, kv block) pair. Each block's ranges (min/max of index and segment
id, min position) tell when a pair cannot hold a visible key: every key after every query, segment
ranges disjoint, or every key outside the window and none a sink. Such a pair is dead. Each q
block loops only from its first to its last live kv block (causal contiguous rows stop at the
diagonal, windows start late) and skips the dead blocks in between (between the sinks and the
window; the far half in zigzag layouts). The backward does the same from the kv side.

Two frames run the same per-block math:
- "gpu" (Triton): grid (batch, heads, q blocks). Each program loops over the kv blocks of the
  whole kv row. Block sizes are powers of two >= 16. head_dim is zero-padded to one.
- "tpu" (Mosaic): grid (batch, heads, q blocks, kv blocks) with the kv axis sequential and the
  softmax state in VMEM scratch. Dead pairs skip the compute. Index maps clamp to the live span
  from the scalar-prefetched schedule, so the pipeline skips their DMA too. Layouts follow JAX's
  shipped TPU kernels: row statistics replicated over 128 lanes, kv tokens over 8 sublanes.
  Blocks are multiples of 128. The schedule (7 int32 per block) sits in SMEM, which bounds the
  blocks per call.
JAX's splash attention is not used. It cannot express sinks by in-document position or permuted
token order, and the contract cannot tell statically which calls are plain causal rows.

Backward (flash-attention-2): delta = rowsum(dout * out) - dlse (float32). P is recomputed from
q, k and the given lse. So `out`/`lse` may be those of a larger attention, e.g. ring attention's
global ones. Rows with lse = -inf contribute nothing. dk/dv sum over the query heads of their kv
head inside the kernel (a loop on GPU, a sequential grid axis on TPU), with no repeat of k/v.
The cotangent of lse is supported: d lse / d scores = P, so it only shifts delta.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from lcjax.kernels.mask import Tokens, check_mask_args

f32 = jnp.float32
NUM_LANES, NUM_SUBLANES = 128, 8
_FAR = 1 << 30  # beyond any index or position: ranges of empty blocks, the index of kv padding
_NT = (((1,), (1,)), ((), ()))  # dot_general contracting both last dims: a @ b.T

# -- The schedule: per block, its live span on the other side and its token ranges --------------

# Fields of a schedule table [batch, _FIELDS, blocks] (int32).
_SPAN_LO, _SPAN_HI = 0, 1  # live blocks on the other side: [lo, hi), (0, 0) if none
_FIELDS = 7  # then the _Ranges fields


class _Ranges(NamedTuple):
  """Token ranges of a block (arrays over blocks, or scalars inside a kernel)."""
  lo_index: Any
  hi_index: Any
  lo_segment: Any
  hi_segment: Any
  lo_position: Any


def _live(q: _Ranges, kv: _Ranges, window: int | None, sinks: int):
  """False where no query of the q block can see a key of the kv block (the mask, on ranges)."""
  live = ((kv.lo_index <= q.hi_index) & (kv.lo_segment <= q.hi_segment)
          & (q.lo_segment <= kv.hi_segment))
  if window is not None:
    live &= (q.lo_index - kv.hi_index < window) | (kv.lo_position < sinks)
  return live


def _block_ranges(tokens: Tokens, block: int, length: int) -> _Ranges:
  """Ranges of each block, `[batch, seq // block]` each, over the first `length` (real) tokens.

  Padding is left out: a block of padding only has lo = _FAR > hi = -_FAR, so it is dead.
  """
  batch, seq = tokens.index.shape
  real = jnp.arange(seq) < length

  def lo(x):
    return jnp.where(real, x, _FAR).reshape(batch, -1, block).min(-1)

  def hi(x):
    return jnp.where(real, x, -_FAR).reshape(batch, -1, block).max(-1)

  return _Ranges(lo(tokens.index), hi(tokens.index), lo(tokens.segment_ids),
                 hi(tokens.segment_ids), lo(tokens.positions))


def _live_span(live: jax.Array) -> tuple[jax.Array, jax.Array]:
  """bool `[..., n]` -> first and last + 1 live positions, `[...]` each; (0, 0) if none."""
  n = live.shape[-1]
  some = live.any(-1)
  first = jnp.argmax(live, axis=-1)
  last = n - jnp.argmax(live[..., ::-1], axis=-1)
  return jnp.where(some, first, 0), jnp.where(some, last, 0)


def _schedule(q_tokens: Tokens, kv_tokens: Tokens, q_len: int, kv_len: int, block_q: int,
              block_kv: int, window: int | None, sinks: int) -> tuple[jax.Array, jax.Array]:
  """Padded tokens -> the q table `[batch, 7, nq]` and the kv table `[batch, 7, nk]`, int32.

  The block-pair liveness in between is `[batch, nq, nk]` booleans, reduced right away.
  """
  q_ranges = _block_ranges(q_tokens, block_q, q_len)
  kv_ranges = _block_ranges(kv_tokens, block_kv, kv_len)
  live = _live(_Ranges(*(x[:, :, None] for x in q_ranges)),
               _Ranges(*(x[:, None, :] for x in kv_ranges)), window, sinks)
  q_table = jnp.stack([*_live_span(live), *q_ranges], axis=1)
  kv_table = jnp.stack([*_live_span(jnp.swapaxes(live, 1, 2)), *kv_ranges], axis=1)
  return q_table.astype(jnp.int32), kv_table.astype(jnp.int32)


def _read_block(read, block) -> tuple[Any, Any, _Ranges]:
  """Inside a kernel: `read(field, block)` -> the block's live span and its ranges (scalars)."""
  return (read(_SPAN_LO, block), read(_SPAN_HI, block),
          _Ranges(*(read(f, block) for f in range(2, _FIELDS))))


# -- Per-block math, shared by both frames -------------------------------------------------------
# Row statistics (m, l, lse, delta) are [rows, w]: w = 1 on GPU, 128 replicated lanes on TPU.


def _widen(x: jax.Array, n: int) -> jax.Array:
  """[rows, w] -> [rows, n]: broadcast a column, or tile/cut the replicated lanes (TPU)."""
  w = x.shape[1]
  if w == 1 or w == n:
    return jnp.broadcast_to(x, (x.shape[0], n))
  return x[:, :n] if n < w else jnp.tile(x, (1, n // w))


def _visible(q_seg, q_idx, kv_seg, kv_idx, kv_pos, window: int | None, sinks: int) -> jax.Array:
  """The mask of `attention.visible` on token blocks that broadcast to [bq, bk]."""
  mask = (q_seg == kv_seg) & (kv_idx <= q_idx)
  if window is not None:
    near = q_idx - kv_idx < window
    mask &= (near | (kv_pos < sinks)) if sinks else near
  return mask


def _scores(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
  """[bq, d], [bk, d] -> float32 [bq, bk]."""
  return lax.dot_general(q, k, _NT, preferred_element_type=f32) * scale


def _softmax_step(s, mask, v, m, l, acc):
  """One kv block of the online softmax: scores s [bq, bk], v [bk, d]; state m, l, acc [bq, d].

  m stays -inf for rows that have seen nothing yet; they shift by 0 so no -inf - -inf appears.
  """
  s = jnp.where(mask, s, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.exp(s - _widen(shift, s.shape[1]))
  alpha = jnp.exp(m - shift)
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=f32)
  return m_new, l, _widen(alpha, acc.shape[1]) * acc + pv


def _softmax_finish(m, l, acc):
  """-> out [bq, d] float32 (0 where nothing was seen), lse like m (-inf there)."""
  seen = l > 0
  safe_l = jnp.where(seen, l, 1.0)
  out = acc * _widen(jnp.where(seen, 1.0 / safe_l, 0.0), acc.shape[1])
  return out, jnp.where(seen, m + jnp.log(safe_l), -jnp.inf)


def _probs_and_dscores(q, k, v, do, lse, delta, mask, scale):
  """-> P [bq, bk] and dL/d(q.k) [bq, bk] (the scale applied), both float32.

  lse is given (it may be a larger attention's): P = exp(s - lse), zero where masked or
  where lse = -inf (the row sees nothing anywhere).
  """
  s = _scores(q, k, scale)
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
  p = jnp.where(mask, jnp.exp(s - _widen(lse, s.shape[1])), 0.0)
  dp = lax.dot_general(do, v, _NT, preferred_element_type=f32)
  return p, p * (dp - _widen(delta, s.shape[1])) * scale


def _dot_t(a, b):
  """a [n, m] float32, b [n, d] -> a.T @ b [m, d] float32, a cast to b's dtype."""
  return lax.dot(a.T.astype(b.dtype), b, preferred_element_type=f32)


# -- Plan: block sizes, padding, backend ----------------------------------------------------------


class _Plan(NamedTuple):
  backend: str
  interpret: Any  # False, True, or pltpu.InterpretParams (TPU frame)
  block_q: int
  block_kv: int
  q_len: int
  kv_len: int
  q_pad: int  # padded sequence lengths
  kv_pad: int
  group: int  # query heads per kv head
  head_dim: int
  scale: float
  window: int | None
  sinks: int

  @property
  def nq(self):
    return self.q_pad // self.block_q

  @property
  def nk(self):
    return self.kv_pad // self.block_kv


def _resolve_backend(backend: str | None, interpret: Any = False) -> str:
  if backend is None:
    platform = jax.default_backend()
    if platform == "cpu" and not interpret:
      raise ValueError("Pallas flash attention runs on CPU only with interpret=True.")
    backend = "tpu" if platform == "tpu" else "gpu"
  if backend not in ("gpu", "tpu"):
    raise ValueError(f"backend={backend!r}: choose 'gpu', 'tpu' or None (the default device).")
  return backend


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _fit_block(block: int, seq: int, minimum: int, backend: str) -> int:
  """Shrinks a block for short sequences: to a power of two (GPU) or multiple of `minimum`."""
  fit = max(minimum, pl.next_power_of_2(seq) if backend == "gpu" else _round_up(seq, minimum))
  return min(block, fit)


def supports(q, k, v, *, backend: str | None = None, block_q: int = 128,
             block_kv: int = 128) -> str | None:
  """None if the kernels take these shapes and dtypes, else a one-line reason."""
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    return f"q {q.shape}, k {k.shape}, v {v.shape}: want [batch, seq, heads, head_dim], k like v."
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    return f"q {q.shape} and k {k.shape} differ in batch or head_dim."
  if q.shape[2] % k.shape[2]:
    return f"heads={q.shape[2]} is not a multiple of kv_heads={k.shape[2]}."
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
  if len(dtypes) > 1 or dtypes - {jnp.dtype(f32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)}:
    return f"dtypes {sorted(map(str, dtypes))}: want one of float32, bfloat16, float16."
  head_dim = q.shape[3]
  backend = "tpu" if backend is None and jax.default_backend() == "tpu" else backend or "gpu"
  if backend == "gpu":
    for name, b in (("block_q", block_q), ("block_kv", block_kv)):
      if b < 16 or b & (b - 1):
        return f"{name}={b}: Triton blocks are powers of two >= 16."
    if head_dim > 256:
      return f"head_dim={head_dim} > 256 does not fit a Triton program's registers."
  else:
    if q.dtype == jnp.float16:
      return "float16 on TPU: use bfloat16 or float32."
    # Both block sizes are lane dims somewhere: kv in the scores, q in their transpose (dk, dv).
    for name, b in (("block_q", block_q), ("block_kv", block_kv)):
      if b % NUM_LANES:
        return f"{name}={b}: the TPU kernels want a multiple of {NUM_LANES}."
    if head_dim % NUM_LANES and head_dim > NUM_LANES:
      return f"head_dim={head_dim}: the TPU kernels want <= 128 or a multiple of 128."
  return None


def _plan(q, k, v, *, window, sinks, block_q, block_kv, backend, interpret) -> _Plan:
  check_mask_args(window, sinks)
  backend = _resolve_backend(backend, interpret)
  reason = supports(q, k, v, backend=backend, block_q=block_q, block_kv=block_kv)
  if reason:
    raise ValueError(reason)
  if backend == "tpu" and interpret is True:
    interpret = pltpu.InterpretParams()
  q_len, kv_len = q.shape[1], k.shape[1]
  minimum = 16 if backend == "gpu" else NUM_LANES
  block_q = _fit_block(block_q, q_len, minimum, backend)
  block_kv = _fit_block(block_kv, kv_len, minimum, backend)
  head_dim = q.shape[3]
  return _Plan(backend, interpret, block_q, block_kv, q_len, kv_len, _round_up(q_len, block_q),
               _round_up(kv_len, block_kv), q.shape[2] // k.shape[2], head_dim,
               1.0 / float(head_dim) ** 0.5, window, sinks)


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value) if size > x.shape[axis] else x


def _pad_tokens(tokens: Tokens, size: int, *, is_kv: bool) -> Tokens:
  """Padding tokens in segments no real token has (-1 for queries, -2 for keys).

  Padded keys also sit after every query (index _FAR) and are no sinks.
  """
  segment, index, position = (-2, _FAR, _FAR) if is_kv else (-1, -1, 0)
  return Tokens(*(_pad_axis(x.astype(jnp.int32), 1, size, value) for x, value in
                  zip(tokens, (segment, index, position))))


def _prepare_tokens(plan: _Plan, q_tokens: Tokens, kv_tokens: Tokens):
  q_tokens = _pad_tokens(q_tokens, plan.q_pad, is_kv=False)
  kv_tokens = _pad_tokens(kv_tokens, plan.kv_pad, is_kv=True)
  tables = _schedule(q_tokens, kv_tokens, plan.q_len, plan.kv_len, plan.block_q, plan.block_kv,
                     plan.window, plan.sinks)
  return q_tokens, kv_tokens, tables


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
      q_table=pl.BlockSpec((None, _FIELDS, plan.nq), lambda b, h, i: (b, 0, 0)),
      kv_table=pl.BlockSpec((None, _FIELDS, plan.nk), lambda b, h, i: (b, 0, 0)),
  )


def _gpu_loop_over_kv(plan: _Plan, q_table_ref, kv_table_ref, step, state):
  """Runs `step(kv_slice, state)` over the live kv blocks of this program's q block."""
  lo, hi, q_ranges = _read_block(lambda f, i: q_table_ref[f, i], pl.program_id(2))

  def body(j, state):
    *_, kv_ranges = _read_block(lambda f, j: kv_table_ref[f, j], j)
    kv_slice = pl.ds(pl.multiple_of(j * plan.block_kv, plan.block_kv), plan.block_kv)
    return lax.cond(_live(q_ranges, kv_ranges, plan.window, plan.sinks),
                    lambda s: step(kv_slice, s), lambda s: s, state)

  return lax.fori_loop(lo, hi, body, state)


def _gpu_fwd_kernel(q_table_ref, kv_table_ref, q_ref, k_ref, v_ref, q_seg_ref, q_idx_ref,
                    kv_seg_ref, kv_idx_ref, kv_pos_ref, out_ref, lse_ref, *, plan: _Plan):
  q = q_ref[...]
  q_seg, q_idx = q_seg_ref[...][:, None], q_idx_ref[...][:, None]

  def step(kv, state):
    mask = _visible(q_seg, q_idx, kv_seg_ref[kv][None, :], kv_idx_ref[kv][None, :],
                    kv_pos_ref[kv][None, :], plan.window, plan.sinks)
    return _softmax_step(_scores(q, k_ref[kv, :], plan.scale), mask, v_ref[kv, :], *state)

  rows = q.shape[0]
  state = (jnp.full((rows, 1), -jnp.inf, f32), jnp.zeros((rows, 1), f32),
           jnp.zeros((rows, v_ref.shape[-1]), f32))
  out, lse = _softmax_finish(*_gpu_loop_over_kv(plan, q_table_ref, kv_table_ref, step, state))
  out_ref[...] = out.astype(out_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _gpu_dq_kernel(q_table_ref, kv_table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                   q_seg_ref, q_idx_ref, kv_seg_ref, kv_idx_ref, kv_pos_ref, dq_ref, *,
                   plan: _Plan):
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  q_seg, q_idx = q_seg_ref[...][:, None], q_idx_ref[...][:, None]

  def step(kv, dq):
    k = k_ref[kv, :]
    mask = _visible(q_seg, q_idx, kv_seg_ref[kv][None, :], kv_idx_ref[kv][None, :],
                    kv_pos_ref[kv][None, :], plan.window, plan.sinks)
    _, ds = _probs_and_dscores(q, k, v_ref[kv, :], do, lse, delta, mask, plan.scale)
    return dq + lax.dot(ds.astype(k.dtype), k, preferred_element_type=f32)

  dq = _gpu_loop_over_kv(plan, q_table_ref, kv_table_ref, step, jnp.zeros(q.shape, f32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _gpu_dkv_kernel(q_table_ref, kv_table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                    q_seg_ref, q_idx_ref, kv_seg_ref, kv_idx_ref, kv_pos_ref, dk_ref, dv_ref, *,
                    plan: _Plan):
  """Grid (batch, kv heads, kv blocks); loops over the group's query heads, then q blocks."""
  k, v = k_ref[...], v_ref[...]
  kv_seg, kv_idx, kv_pos = (r[...][None, :] for r in (kv_seg_ref, kv_idx_ref, kv_pos_ref))
  lo, hi, kv_ranges = _read_block(lambda f, j: kv_table_ref[f, j], pl.program_id(2))
  bq = plan.block_q

  def q_block(g, i, carry):
    q_slice = pl.ds(pl.multiple_of(i * bq, bq), bq)
    q, do = q_ref[q_slice, g, :], do_ref[q_slice, g, :]
    lse, delta = lse_ref[g, q_slice][:, None], delta_ref[g, q_slice][:, None]
    mask = _visible(q_seg_ref[q_slice][:, None], q_idx_ref[q_slice][:, None], kv_seg, kv_idx,
                    kv_pos, plan.window, plan.sinks)
    p, ds = _probs_and_dscores(q, k, v, do, lse, delta, mask, plan.scale)
    dk, dv = carry
    return dk + _dot_t(ds, q), dv + _dot_t(p, do)

  def body(g, i, carry):
    *_, q_ranges = _read_block(lambda f, i: q_table_ref[f, i], i)
    return lax.cond(_live(q_ranges, kv_ranges, plan.window, plan.sinks),
                    lambda c: q_block(g, i, c), lambda c: c, carry)

  def head(g, carry):
    return lax.fori_loop(lo, hi, lambda i, c: body(g, i, c), carry)

  zeros = jnp.zeros(k.shape, f32)
  dk, dv = lax.fori_loop(0, plan.group, head, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_pad_head(x: jax.Array) -> jax.Array:
  """Zero-pads head_dim to a power of two >= 16 (zeros add nothing to q.k and give 0 outputs)."""
  return _pad_axis(x, 3, max(16, pl.next_power_of_2(x.shape[3])))


def _gpu_fwd(plan, q, k, v, q_tokens, kv_tokens, tables):
  batch, _, heads, _ = q.shape
  q = _gpu_pad_head(_pad_axis(q, 1, plan.q_pad))
  k, v = (_gpu_pad_head(_pad_axis(x, 1, plan.kv_pad)) for x in (k, v))
  d = q.shape[3]
  s = _gpu_specs(plan, d)
  out, lse = pl.pallas_call(
      functools.partial(_gpu_fwd_kernel, plan=plan),
      grid=(batch, heads, plan.nq),
      in_specs=[s["q_table"], s["kv_table"], s["q"], s["kv"], s["kv"], s["q_tok"], s["q_tok"],
                s["kv_tok"], s["kv_tok"], s["kv_tok"]],
      out_specs=[s["q"], s["row_q"]],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, plan.q_pad), f32)],
      compiler_params=_gpu_compiler_params(d),
      interpret=plan.interpret,
      name="flash_fwd",
  )(*tables, q, k, v, q_tokens.segment_ids, q_tokens.index, *kv_tokens)
  return out[:, :, :, :plan.head_dim], lse


def _gpu_bwd(plan, q, k, v, q_tokens, kv_tokens, tables, do, lse, delta):
  batch, _, heads, _ = q.shape
  kv_heads = k.shape[2]
  q, do = (_gpu_pad_head(x) for x in (q, do))
  k, v = (_gpu_pad_head(x) for x in (k, v))
  d = q.shape[3]
  s = _gpu_specs(plan, d)
  tokens = (q_tokens.segment_ids, q_tokens.index, *kv_tokens)
  dq = pl.pallas_call(
      functools.partial(_gpu_dq_kernel, plan=plan),
      grid=(batch, heads, plan.nq),
      in_specs=[s["q_table"], s["kv_table"], s["q"], s["kv"], s["kv"], s["q"], s["row_q"],
                s["row_q"], s["q_tok"], s["q_tok"], s["kv_tok"], s["kv_tok"], s["kv_tok"]],
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
  table = lambda n: pl.BlockSpec((None, _FIELDS, n), lambda b, h, j: (b, 0, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_gpu_dkv_kernel, plan=plan),
      grid=(batch, kv_heads, plan.nk),
      in_specs=[table(plan.nq), table(plan.nk), q_rows, kv_block, kv_block, q_rows, row_stats,
                row_stats, q_tok, q_tok, kv_tok, kv_tok, kv_tok],
      out_specs=[kv_block, kv_block],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
      compiler_params=_gpu_compiler_params(d),
      interpret=plan.interpret,
      name="flash_bwd_dkv",
  )(*tables, q, k, v, do, lse, delta, *tokens)
  return tuple(x[:, :, :, :plan.head_dim] for x in (dq, dk, dv))


# -- TPU frame (Mosaic): grid (..., q blocks, kv blocks), state in VMEM scratch ------------------
# Arrays are [batch, heads, seq, head_dim]; q tokens [batch, seq, 128] (lanes), kv tokens
# [batch, 8, seq] (sublanes), row statistics [batch, heads, seq, 128]. The schedule tables are
# scalar-prefetched (SMEM), flattened: field f of block j of row b is at (b * 7 + f) * n + j.


def _tpu_reader(table_ref, b, n):
  return lambda f, j: table_ref[(b * _FIELDS + f) * n + j]


def _clamp(j, lo, hi):
  """Block j, clamped to the live span [lo, hi): dead steps revisit a block, so no DMA."""
  return jnp.maximum(jnp.minimum(j, hi - 1), lo)


def _tpu_mask(plan, q_seg_ref, q_idx_ref, kv_seg_ref, kv_idx_ref, kv_pos_ref):
  bk = kv_seg_ref.shape[1]
  q_seg, q_idx = (_widen(r[...], bk) for r in (q_seg_ref, q_idx_ref))
  kv_seg, kv_idx, kv_pos = (r[:1, :] for r in (kv_seg_ref, kv_idx_ref, kv_pos_ref))
  return _visible(q_seg, q_idx, kv_seg, kv_idx, kv_pos, plan.window, plan.sinks)


def _tpu_q_major_specs(plan: _Plan, head_dim: int):
  """BlockSpecs for grid (batch, q heads, q blocks, kv blocks) + 2 prefetched tables."""
  bq, bk, nq, group = plan.block_q, plan.block_kv, plan.nq, plan.group

  def kv_block(b, i, j, q_table):
    read = _tpu_reader(q_table, b, nq)
    return _clamp(j, read(_SPAN_LO, i), read(_SPAN_HI, i))

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
  *_, q_ranges = _read_block(_tpu_reader(q_table_ref, b, plan.nq), i)
  *_, kv_ranges = _read_block(_tpu_reader(kv_table_ref, b, plan.nk), j)
  return _live(q_ranges, kv_ranges, plan.window, plan.sinks)


def _tpu_fwd_kernel(q_table_ref, kv_table_ref, q_ref, k_ref, v_ref, q_seg_ref, q_idx_ref,
                    kv_seg_ref, kv_idx_ref, kv_pos_ref, out_ref, lse_ref, m_ref, l_ref, acc_ref,
                    *, plan: _Plan):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, f32)
    l_ref[...] = jnp.zeros(l_ref.shape, f32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, f32)

  @pl.when(_tpu_live(plan, q_table_ref, kv_table_ref, b, i, j))
  def _():
    mask = _tpu_mask(plan, q_seg_ref, q_idx_ref, kv_seg_ref, kv_idx_ref, kv_pos_ref)
    state = (m_ref[...], l_ref[...], acc_ref[...])
    m, l, acc = _softmax_step(_scores(q_ref[...], k_ref[...], plan.scale), mask, v_ref[...],
                              *state)
    m_ref[...], l_ref[...], acc_ref[...] = m, l, acc

  @pl.when(j == plan.nk - 1)
  def _():
    out, lse = _softmax_finish(m_ref[...], l_ref[...], acc_ref[...])
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = lse


def _tpu_dq_kernel(q_table_ref, kv_table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                   q_seg_ref, q_idx_ref, kv_seg_ref, kv_idx_ref, kv_pos_ref, dq_ref, dq_acc_ref,
                   *, plan: _Plan):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, f32)

  @pl.when(_tpu_live(plan, q_table_ref, kv_table_ref, b, i, j))
  def _():
    mask = _tpu_mask(plan, q_seg_ref, q_idx_ref, kv_seg_ref, kv_idx_ref, kv_pos_ref)
    k = k_ref[...]
    _, ds = _probs_and_dscores(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...],
                               delta_ref[...], mask, plan.scale)
    dq_acc_ref[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=f32)

  @pl.when(j == plan.nk - 1)
  def _():
    dq_ref[...] = dq_acc_ref[...].astype(dq_ref.dtype)


def _tpu_dkv_kernel(q_table_ref, kv_table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                    q_seg_ref, q_idx_ref, kv_seg_ref, kv_idx_ref, kv_pos_ref, dk_ref, dv_ref,
                    dk_acc_ref, dv_acc_ref, *, plan: _Plan):
  """Grid (batch, kv heads, kv blocks, group, q blocks): sums over the group's query heads."""
  b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((g == 0) & (i == 0))
  def _():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, f32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, f32)

  @pl.when(_tpu_live(plan, q_table_ref, kv_table_ref, b, i, j))
  def _():
    mask = _tpu_mask(plan, q_seg_ref, q_idx_ref, kv_seg_ref, kv_idx_ref, kv_pos_ref)
    q, do = q_ref[...], do_ref[...]
    p, ds = _probs_and_dscores(q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...], mask,
                               plan.scale)
    dk_acc_ref[...] += _dot_t(ds, q)
    dv_acc_ref[...] += _dot_t(p, do)

  @pl.when((g == plan.group - 1) & (i == plan.nq - 1))
  def _():
    dk_ref[...] = dk_acc_ref[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _tpu_tokens(q_tokens: Tokens, kv_tokens: Tokens):
  """q segment/index broadcast over lanes [batch, seq, 128]; kv tokens over sublanes."""
  lanes = lambda x: jnp.broadcast_to(x[:, :, None], (*x.shape, NUM_LANES))
  sublanes = lambda x: jnp.broadcast_to(x[:, None, :], (x.shape[0], NUM_SUBLANES, x.shape[1]))
  return (lanes(q_tokens.segment_ids), lanes(q_tokens.index), *map(sublanes, kv_tokens))


def _tpu_rows(x: jax.Array) -> jax.Array:
  """[batch, heads, seq] -> [batch, heads, seq, 128] float32, replicated over lanes."""
  return jnp.broadcast_to(x.astype(f32)[..., None], (*x.shape, NUM_LANES))


def _tpu_fwd(plan, q, k, v, q_tokens, kv_tokens, tables):
  batch, _, heads, d = q.shape
  q = _pad_axis(q, 1, plan.q_pad).swapaxes(1, 2)
  k, v = (_pad_axis(x, 1, plan.kv_pad).swapaxes(1, 2) for x in (k, v))
  s = _tpu_q_major_specs(plan, d)
  out, lse = _tpu_call(
      functools.partial(_tpu_fwd_kernel, plan=plan), plan, (batch, heads, plan.nq, plan.nk),
      [s["q"], s["kv"], s["kv"], s["q_tok"], s["q_tok"], s["kv_tok"], s["kv_tok"], s["kv_tok"]],
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
      [s["q"], s["kv"], s["kv"], s["q"], s["row_q"], s["row_q"], s["q_tok"], s["q_tok"],
       s["kv_tok"], s["kv_tok"], s["kv_tok"]],
      s["q"], jax.ShapeDtypeStruct(q.shape, q.dtype), [pltpu.VMEM((plan.block_q, d), f32)],
      sequential=1, name="flash_bwd_dq",
  )(*flat_tables, q, k, v, do, lse, delta, *tokens)

  # Grid (batch, kv heads, kv blocks, group, q blocks); q blocks clamp to the kv block's span.
  bq, bk, nk, group = plan.block_q, plan.block_kv, plan.nk, plan.group

  def q_block(b, j, i, kv_table):
    read = _tpu_reader(kv_table, b, nk)
    return _clamp(i, read(_SPAN_LO, j), read(_SPAN_HI, j))

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
      [q_spec, kv_spec, kv_spec, q_spec, rows, rows, q_tok, q_tok, kv_tok, kv_tok, kv_tok],
      [kv_spec, kv_spec], [jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
      [pltpu.VMEM((bk, d), f32), pltpu.VMEM((bk, d), f32)],
      sequential=2, name="flash_bwd_dkv",
  )(*flat_tables, q, k, v, do, lse, delta, *tokens)
  return dq.swapaxes(1, 2), dk.swapaxes(1, 2), dv.swapaxes(1, 2)


# -- Public API ----------------------------------------------------------------------------------


def flash_fwd(q, k, v, q_tokens: Tokens, kv_tokens: Tokens, *, window: int | None = None,
              sinks: int = 0, block_q: int = 128, block_kv: int = 128, backend: str | None = None,
              interpret: Any = False) -> tuple[jax.Array, jax.Array]:
  """Flash attention forward: (out like q, lse `[batch, heads, q_seq]` float32).

  Shapes, mask and lse as in `attention.py`. Sequences of any length are padded to the blocks
  inside. backend: "gpu", "tpu", or None for the default device's (Triton on CPU in interpret
  mode). interpret: True runs on CPU (the TPU frame in TPU interpret mode), or a
  `pltpu.InterpretParams`.
  """
  plan = _plan(q, k, v, window=window, sinks=sinks, block_q=block_q, block_kv=block_kv,
               backend=backend, interpret=interpret)
  q_tokens, kv_tokens, tables = _prepare_tokens(plan, q_tokens, kv_tokens)
  fwd = _gpu_fwd if plan.backend == "gpu" else _tpu_fwd
  out, lse = fwd(plan, q, k, v, q_tokens, kv_tokens, tables)
  return out[:, :plan.q_len], lse[:, :, :plan.q_len]


def flash_bwd(q, k, v, q_tokens: Tokens, kv_tokens: Tokens, out, lse, dout, *, dlse=None,
              window: int | None = None, sinks: int = 0, block_q: int = 128,
              block_kv: int = 128, backend: str | None = None,
              interpret: Any = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Gradients (dq, dk, dv) of attention over these keys, given the row's out, lse, dout.

  out and lse `[batch, heads, q_seq]` may belong to a larger attention of the same queries (all
  kv blocks of ring attention): then these are this kv set's shares of the gradients. dlse, the
  cotangent of lse (None: zero), shifts delta. Other arguments as in `flash_fwd`.
  """
  plan = _plan(q, k, v, window=window, sinks=sinks, block_q=block_q, block_kv=block_kv,
               backend=backend, interpret=interpret)
  q_tokens, kv_tokens, tables = _prepare_tokens(plan, q_tokens, kv_tokens)
  delta = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1).swapaxes(1, 2)
  if dlse is not None:
    delta -= dlse.astype(f32)
  dout = dout.astype(q.dtype)  # a larger attention's out (and dout) may be float32
  pad_q = functools.partial(_pad_axis, axis=1, size=plan.q_pad)
  q, dout = pad_q(q), pad_q(dout)
  k, v = (_pad_axis(x, 1, plan.kv_pad) for x in (k, v))
  # Padded query rows see nothing: lse -inf makes their P zero.
  lse = _pad_axis(lse.astype(f32), 2, plan.q_pad, -jnp.inf)
  delta = _pad_axis(delta, 2, plan.q_pad)
  bwd = _gpu_bwd if plan.backend == "gpu" else _tpu_bwd
  dq, dk, dv = bwd(plan, q, k, v, q_tokens, kv_tokens, tables, dout, lse, delta)
  return dq[:, :plan.q_len], dk[:, :plan.kv_len], dv[:, :plan.kv_len]


class _Config(NamedTuple):
  window: int | None
  sinks: int
  block_q: int
  block_kv: int
  backend: str | None
  interpret: Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_tokens, kv_tokens, config):
  return flash_fwd(q, k, v, q_tokens, kv_tokens, **config._asdict())


def _flash_vjp_fwd(q, k, v, q_tokens, kv_tokens, config):
  out, lse = flash_fwd(q, k, v, q_tokens, kv_tokens, **config._asdict())
  return (out, lse), (q, k, v, q_tokens, kv_tokens, out, lse)


def _flash_vjp_bwd(config, residuals, cotangents):
  q, k, v, q_tokens, kv_tokens, out, lse = residuals
  dout, dlse = cotangents
  dq, dk, dv = flash_bwd(q, k, v, q_tokens, kv_tokens, out, lse, dout, dlse=dlse,
                         **config._asdict())
  return dq, dk, dv, None, None


_flash.defvjp(_flash_vjp_fwd, _flash_vjp_bwd)


def flash_attention(q, k, v, q_tokens: Tokens, kv_tokens: Tokens, *, window: int | None = None,
                    sinks: int = 0, block_q: int = 128, block_kv: int = 128,
                    backend: str | None = None,
                    interpret: Any = False) -> tuple[jax.Array, jax.Array]:
  """`flash_fwd` with the Pallas backward as its VJP (through both out and lse)."""
  config = _Config(window, sinks, block_q, block_kv, backend, interpret)
  return _flash(q, k, v, q_tokens, kv_tokens, config)
