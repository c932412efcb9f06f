"""Mamba-2 SSD as Pallas kernels (GPU: Triton, TPU: Mosaic), with the semantics of `ssd_chunked`.

Same signature, shapes, document resets and precision as `lcjax.kernels.ssd` (read its module doc
and `ssd_chunked` first), plus `backend` and `interpret`. The work splits as:

  XLA     per position, float32: a = dt * A, set to -inf where a document starts (so every decay
          through that position is exactly 0, and segment ids never enter a kernel); within each
          chunk its prefix sums a_cum (log decay from the chunk start) and exclusive suffix sums
          a_suf (log decay to the chunk end). O(seq * heads).
  kernel 1, grid (batch, chunk, head): the state the chunk leaves behind from its own inputs,
          (x * dt * exp(a_suf))^T B                                      -> [head_dim, d_state]
  XLA     a float32 scan over chunks, h_next = exp(a_cum[last]) * h + own_state, seeded by
          initial_state: the state entering every chunk, and final_state.
  kernel 2, grid (batch, chunk, head): the outputs, quadratic in the chunk,
          y_i = sum_j (C_i . B_j) decay(j -> i) dt_j x_j  +  exp(a_cum_i) C_i . h_in.

Backward (`jax.custom_vjp`): kernel 2's backward (dx, ddt, dB, dC per head, d a, d a_cum, and
d h_in), then the reverse scan in XLA (d h_in -> d own states, d chunk decays, d initial_state),
then kernel 1's backward, which adds its share to dx and dB. The per-position chain (a_cum, a_suf
-> a -> dt, A; dA = sum over positions of d a * dt) is XLA autodiff of the cheap prefix math.

Stability and layouts: `lcjax.kernels.ssd_pallas_kernels`. The per-position a_cum and a_suf
are windows themselves (from the chunk start, to the chunk end), so their plain prefix and suffix
sums keep their error relative to their size. dB and dC leave the backward kernels per head and
are summed over each group's heads in XLA.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lcjax.kernels import ssd_pallas_kernels as kernels
from lcjax.kernels.ssd_common import check_shapes, document_starts, f32, pass_states, zero_state

BACKENDS = ("gpu", "tpu")


def _is_power_of_two(n):
  return n > 0 and n & (n - 1) == 0


def supports(x, B, *, chunk_size, backend=None):
  """None if `ssd_pallas` takes these shapes and dtypes on `backend`, else a one-line reason."""
  backend = backend or _default_backend()
  if backend not in BACKENDS:
    return f"unknown backend {backend!r}; choose one of {BACKENDS}."
  if x.dtype not in (jnp.float32, jnp.bfloat16):
    return f"x.dtype {x.dtype} is not float32 or bfloat16."
  head_dim, d_state = x.shape[-1], B.shape[-1]
  if backend == "gpu":
    # Triton tensors have power-of-two dims, and its dot wants every dim >= 16.
    for name, size in (("chunk_size", chunk_size), ("head_dim", head_dim), ("d_state", d_state)):
      if not (_is_power_of_two(size) and size >= 16):
        return f"Triton needs {name}={size} to be a power of two >= 16."
  elif chunk_size % 128:
    # Per-position rows are [1, chunk] blocks: their last dim must be a multiple of 128.
    return f"Mosaic needs chunk_size={chunk_size} to be a multiple of 128."
  return None


def _default_backend():
  return "tpu" if jax.default_backend() == "tpu" else "gpu"



def _chunk_decays(cfg, a_cum):
  """a_cum `[b, h, s]` -> each chunk's whole decay `[c, b, h]` (0 if a document starts in it)."""
  return jnp.exp(jnp.moveaxis(a_cum[..., cfg.chunk - 1::cfg.chunk], -1, 0))


def _sum_group_heads(d, groups, cfg):
  """Per-head dB or dC `[b, s, h, n]` (`[b, h, s, n]` head-major) -> summed over each group's
  heads, `[b, s, g, n]` (`[b, g, s, n]`)."""
  head_axis = 1 if cfg.head_major else 2
  shape = d.shape[:head_axis] + (groups, d.shape[head_axis] // groups) + d.shape[head_axis + 1:]
  return d.reshape(shape).sum(head_axis + 1)


# ---------------------------------------------------------------------------------------------
# The differentiable core: kernel-layout, chunk-padded inputs; custom backward.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ssd_core(cfg, x, B, C, dt, a, a_cum, a_suf, h0):
  return _ssd_core_fwd(cfg, x, B, C, dt, a, a_cum, a_suf, h0)[0]


def _ssd_core_fwd(cfg, x, B, C, dt, a, a_cum, a_suf, h0):
  own_states = kernels.chunk_states(cfg, x, B, dt, a_suf)
  final, states_in = pass_states(_chunk_decays(cfg, a_cum), own_states, h0)
  y = kernels.chunk_outputs(cfg, x, B, C, dt, a, a_cum, states_in)
  return (y, final), (x, B, C, dt, a, a_cum, a_suf, states_in)


def _pass_states_bwd(chunk_decays, states_in, d_states_in, d_final):
  """The transpose of `pass_states` (no resets): cotangents of the states entering the chunks
  and of the final state -> (d initial state, d own states `[c, ...]`, d chunk decays `[c, ...]`).
  g is d loss / d state entering chunk c + 1, then c."""
  def step(g, inputs):
    chunk_decay, state_in, dh_in_direct = inputs
    d_chunk_decay = jnp.sum(g * state_in, axis=(-2, -1))
    return dh_in_direct + chunk_decay[..., None, None] * g, (g, d_chunk_decay)

  dh0, (d_own_states, d_chunk_decays) = lax.scan(
      step, d_final, (chunk_decays, states_in, d_states_in), reverse=True)
  return dh0, d_own_states, d_chunk_decays


def _ssd_core_bwd(cfg, residuals, cotangents):
  x, B, C, dt, a, a_cum, a_suf, states_in = residuals
  dy, d_final = cotangents
  dx, db, dc, ddt, da, da_cum, dh_in = kernels.chunk_outputs_bwd(
      cfg, x, B, C, dt, a, a_cum, states_in, dy)
  chunk_decays = _chunk_decays(cfg, a_cum)
  dh0, d_own_states, d_chunk_decays = _pass_states_bwd(chunk_decays, states_in, dh_in, d_final)
  # A chunk's decay is exp(a_cum at its last position).
  da_cum = da_cum.at[..., cfg.chunk - 1::cfg.chunk].add(
      jnp.moveaxis(d_chunk_decays * chunk_decays, 0, -1))
  dx, db, ddt_state, da_suf = kernels.chunk_states_bwd(cfg, x, B, dt, a_suf, d_own_states, dx, db)
  _, _, _, _, groups, _ = kernels.dims(x, B, cfg)
  dB = _sum_group_heads(db, groups, cfg).astype(B.dtype)
  dC = _sum_group_heads(dc, groups, cfg).astype(C.dtype)
  return dx, dB, dC, ddt + ddt_state, da, da_cum, da_suf, dh0


_ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)


# ---------------------------------------------------------------------------------------------


def _log_decays(dt, A, starts, chunk):
  """dt `[b, s, h]`, A `[h]`, starts bool `[b, s]` (s a multiple of chunk) -> float32 `[b, h, s]`
  head-major: a = dt * A, -inf where a document starts (every decay through it is exactly 0:
  the state before it never reaches it or anything after it); within each chunk its prefix sums
  a_cum and exclusive suffix sums a_suf. Returns (dt, a, a_cum, a_suf)."""
  batch, seq, heads = dt.shape
  dt = jnp.moveaxis(dt.astype(f32), 1, 2)
  a = jnp.where(starts[:, None, :], -jnp.inf, dt * A.astype(f32)[:, None])
  by_chunk = a.reshape(batch, heads, seq // chunk, chunk)
  a_cum = jnp.cumsum(by_chunk, axis=-1).reshape(a.shape)
  after = jnp.pad(by_chunk[..., 1:], ((0, 0), (0, 0), (0, 0), (0, 1)))
  a_suf = lax.cumsum(after, axis=3, reverse=True).reshape(a.shape)
  return dt, a, a_cum, a_suf


def ssd_pallas(x, dt, A, B, C, *, chunk_size=256, segment_ids=None, initial_state=None,
               backend=None, interpret=False):
  """The chunked SSD algorithm as Pallas kernels; semantics and precision of `ssd_chunked`.

  backend: "gpu" (Triton) or "tpu" (Mosaic); None picks from `jax.default_backend()`. See
  `supports` for the shapes each takes. interpret: True runs the kernels in Pallas's interpreter
  (any platform, CPU included); a `pltpu.InterpretParams()` runs them in the TPU interpreter.
  Any seq: the tail is padded with dt = 0 and x = B = C = 0 (the state passes through) and y is
  sliced back. Returns (y like x, final_state float32).
  """
  check_shapes(x, dt, A, B, C)
  backend = backend or _default_backend()
  reason = supports(x, B, chunk_size=chunk_size, backend=backend)
  if reason:
    raise ValueError(f"ssd_pallas: {reason}")
  cfg = kernels.Config(chunk_size, backend, interpret)
  batch, seq = x.shape[:2]
  pad = -seq % chunk_size
  starts = document_starts(segment_ids, batch, seq)
  if pad:
    zero_pad = lambda v: jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
    x, dt, B, C, starts = map(zero_pad, (x, dt, B, C, starts))  # padding joins the last document
  dt, a, a_cum, a_suf = _log_decays(dt, A, starts, chunk_size)

  to_layout = (lambda v: jnp.swapaxes(v, 1, 2)) if cfg.head_major else (lambda v: v)
  h0 = zero_state(x, B) if initial_state is None else initial_state.astype(f32)
  x, B, C = to_layout(x), to_layout(B.astype(x.dtype)), to_layout(C.astype(x.dtype))
  y, final_state = _ssd_core(cfg, x, B, C, dt, a, a_cum, a_suf, h0)
  return to_layout(y)[:, :seq], final_state
