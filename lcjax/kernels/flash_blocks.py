"""What the flash attention kernels share (`flash_attention.py` explains the design): per-block
ranges and the schedule of live (q block, kv block) pairs, the in-kernel mask, the online-softmax
and backward math, and the plan (backend, block sizes, padding) of a call."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

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
