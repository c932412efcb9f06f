"""What the flash attention kernels share (`flash_attention.py` explains the design): the
schedule of live (q block, kv block) pairs and the plan (backend, block sizes, padding) of a
call. The mask is `Mask`'s and the per-tile math `lcjax.kernels.tiles`'."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lcjax.kernels.mask import Mask, Ranges, Tokens, block_ranges
from lcjax.kernels.tiles import f32, pad_tokens

NUM_LANES, NUM_SUBLANES = 128, 8

# -- The schedule: per block, its live span on the other side and its token ranges --------------

# Fields of a schedule table [batch, FIELDS, blocks] (int32).
SPAN_LO, SPAN_HI = 0, 1  # live blocks on the other side: [lo, hi), (0, 0) if none
FIELDS = 2 + len(Ranges._fields)  # then the block's Ranges


def _live_span(live: jax.Array) -> tuple[jax.Array, jax.Array]:
  """bool `[..., n]` -> first and last + 1 live positions, `[...]` each; (0, 0) if none."""
  n = live.shape[-1]
  some = live.any(-1)
  first = jnp.argmax(live, axis=-1)
  last = n - jnp.argmax(live[..., ::-1], axis=-1)
  return jnp.where(some, first, 0), jnp.where(some, last, 0)


def _schedule(q_tokens: Tokens, kv_tokens: Tokens, q_len: int, kv_len: int, block_q: int,
              block_kv: int, mask: Mask) -> tuple[jax.Array, jax.Array]:
  """Padded tokens -> the q table `[batch, FIELDS, nq]` and the kv table `[batch, FIELDS, nk]`.

  The block-pair liveness in between is `[batch, nq, nk]` booleans, reduced right away.
  """
  q_ranges = block_ranges(q_tokens, block_q, q_len)
  kv_ranges = block_ranges(kv_tokens, block_kv, kv_len)
  live = mask.live_pairs(q_ranges, kv_ranges)
  q_table = jnp.stack([*_live_span(live), *q_ranges], axis=1)
  kv_table = jnp.stack([*_live_span(jnp.swapaxes(live, 1, 2)), *kv_ranges], axis=1)
  return q_table.astype(jnp.int32), kv_table.astype(jnp.int32)


def read_block(read, block) -> tuple[Any, Any, Ranges]:
  """Inside a kernel: `read(field, block)` -> the block's live span and its ranges (scalars)."""
  return (read(SPAN_LO, block), read(SPAN_HI, block),
          Ranges(*(read(f, block) for f in range(2, FIELDS))))


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
  mask: Mask

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


def _plan(q, k, v, *, mask, block_q, block_kv, backend, interpret) -> _Plan:
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
               1.0 / float(head_dim) ** 0.5, mask)


def _prepare_tokens(plan: _Plan, q_tokens: Tokens, kv_tokens: Tokens):
  q_tokens = pad_tokens(q_tokens, plan.q_pad, is_kv=False)
  kv_tokens = pad_tokens(kv_tokens, plan.kv_pad, is_kv=True)
  tables = _schedule(q_tokens, kv_tokens, plan.q_len, plan.kv_len, plan.block_q, plan.block_kv,
                     plan.mask)
  return q_tokens, kv_tokens, tables
