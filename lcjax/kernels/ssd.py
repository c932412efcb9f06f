"""Mamba-2 state-space duality (SSD): the scan reference, the minimal chunked form to read
beside it, the chunked form, one decoding step, and `ssd`, which runs the implementation a
model names (`SSD`: "chunked", "reference", "pallas", or "auto").

Per head, with a scalar decay per step and a matrix state h `[head_dim, d_state]`:

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * outer(x_t, B_t)        y_t = h_t @ C_t

The D skip connection (y += D * x) is the caller's. Every implementation has the same signature
and semantics, so the model calls `ssd` and never knows which one ran.

Shapes: x `[batch, seq, heads, head_dim]`, any float dtype; dt `[batch, seq, heads]`, positive
(already softplus'ed and clamped); A `[heads]`, negative; B, C `[batch, seq, groups, d_state]`
with heads % groups == 0, head h reading group h // (heads // groups); segment_ids
`[batch, seq]` int32 or None; initial_state `[batch, heads, head_dim, d_state]` float32 or None
(zeros). Outputs: y like x in x.dtype, final_state `[batch, heads, head_dim, d_state]` float32.

Documents: wherever segment_ids[t] != segment_ids[t-1] the state is zeroed before the update at
t, so nothing leaks between packed documents (padding, id 0, is just another document). The
initial state continues the row's first document only. A caller that splits a row and chains
final_state into initial_state must itself drop the state when the split falls on a boundary.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lcjax.kernels.dispatch import Dispatch
from lcjax.kernels.ssd_common import (
  check_shapes,
  document_index,
  document_starts,
  f32,
  heads_from_groups,
  pass_states,
  zero_state,
)
from lcjax.kernels.ssd_pallas import ssd_pallas
from lcjax.kernels.ssd_pallas import supports as ssd_pallas_supports


def ssd_step(state, x, dt, A, B, C):
  """One token of the recurrence, for decoding.

  state `[batch, heads, head_dim, d_state]`; x `[batch, heads, head_dim]`; dt `[batch, heads]`;
  A `[heads]`; B, C `[batch, groups, d_state]`. Returns (y `[batch, heads, head_dim]` in x.dtype,
  new_state float32). Document starts are the caller's: pass a zero state at one.
  """
  heads = x.shape[1]
  dt = dt.astype(f32)
  B = heads_from_groups(B.astype(f32), heads)
  C = heads_from_groups(C.astype(f32), heads)
  decay = jnp.exp(dt * A.astype(f32))[..., None, None]
  update = (dt[..., None] * x.astype(f32))[..., None] * B[:, :, None, :]
  new_state = decay * state.astype(f32) + update
  y = jnp.einsum("bhpn,bhn->bhp", new_state, C)
  return y.astype(x.dtype), new_state


def ssd_reference(x, dt, A, B, C, *, segment_ids=None, initial_state=None):
  """`lax.scan` over time of exactly the recurrence, all in float32. O(seq) sequential steps."""
  check_shapes(x, dt, A, B, C)
  batch, seq = x.shape[:2]
  state = zero_state(x, B) if initial_state is None else initial_state.astype(f32)
  starts = document_starts(segment_ids, batch, seq)

  def step(state, inputs):
    x_t, dt_t, B_t, C_t, start_t = inputs
    state = jnp.where(start_t[:, None, None, None], 0.0, state)
    y_t, state = ssd_step(state, x_t.astype(f32), dt_t, A, B_t, C_t)
    return state, y_t

  time_major = lambda a: jnp.moveaxis(a, 1, 0)
  final_state, y = lax.scan(step, state, tuple(map(time_major, (x, dt, B, C, starts))))
  return time_major(y).astype(x.dtype), final_state


def _segment_sum(a, same_doc=True):
  """a `[..., chunk]` -> `[..., chunk(i), chunk(j)]`: sum of a over (j, i], -inf where i < j or
  where i and j are in different documents (so exp gives exactly zero there).

  Built as a masked cumulative sum rather than cumsum(a)[i] - cumsum(a)[j]: the difference of
  two long prefix sums loses ~eps * |prefix| absolute, which is a relative error on decays near
  the diagonal (the ones that matter); summing only the window keeps the error relative to it.
  """
  chunk = a.shape[-1]
  idx = jnp.arange(chunk)
  after_j = idx[:, None] > idx[None, :]  # [k, j]: a_k counts towards every window starting at j < k
  windows = jnp.cumsum(jnp.where(after_j, a[..., :, None], 0.0), axis=-2)
  keep = (idx[:, None] >= idx[None, :]) & same_doc
  return jnp.where(keep, windows, -jnp.inf)


def ssd_minimal(x, dt, A, B, C, chunk_size):
  """The chunked algorithm in its plainest form, to read beside `ssd_reference`: one row is one
  document, no initial state, seq a multiple of chunk_size, all float32. Not in IMPLS.

  x `[b, s, h, p]`, dt `[b, s, h]`, A `[h]`, B, C `[b, s, g, n]` -> (y `[b, s, h, p]` in
  x.dtype, final_state `[b, h, p, n]` float32). Einsum axes: c chunk, i/j position in a chunk
  (i the output's, j the input's), z a chunk boundary (0 = the row start).
  """
  batch, seq, heads, _ = x.shape
  n_chunks = seq // chunk_size
  if n_chunks * chunk_size != seq:
    raise ValueError(f"ssd_minimal needs seq={seq} to be a multiple of chunk={chunk_size}.")
  chunks = lambda v: v.astype(f32).reshape(batch, n_chunks, chunk_size, *v.shape[2:])
  x, dt = chunks(x), chunks(dt)
  B, C = (chunks(heads_from_groups(v, heads)) for v in (B, C))  # [b, c, l, h, n]
  a = jnp.moveaxis(dt * A.astype(f32), 2, -1)  # [b, c, h, l]: log decay of each step
  decay = jnp.exp(_segment_sum(a))  # [b, c, h, i, j]: decay from j to i, 0 where i < j
  a_cum = jnp.cumsum(a, axis=-1)  # [b, c, h, i]: log decay from the chunk start to i

  # 1. Diagonal blocks, the intra-chunk outputs: y_i = sum_j (C_i . B_j) decay(j -> i) dt_j x_j.
  y_diag = jnp.einsum("bcihn,bcjhn,bchij,bcjh,bcjhp->bcihp", C, B, decay, dt, x)
  # 2. Intra-chunk states: what each chunk leaves behind from its own inputs.
  to_end = decay[..., -1, :]  # [b, c, h, j]: decay from j to the chunk's last position
  states = jnp.einsum("bcjhn,bchj,bcjh,bcjhp->bchpn", B, to_end, dt, x)
  # 3. Inter-chunk state passing: the state at boundary z (the end of chunk z - 1; 0 is the row
  # start, with a zero state) sums the states left at boundaries c <= z, decayed in between.
  chunk_log = jnp.pad(jnp.moveaxis(a_cum[..., -1], 1, -1), ((0, 0), (0, 0), (1, 0)))  # [b, h, z]
  boundary_decay = jnp.exp(_segment_sum(chunk_log))  # [b, h, z, c]: from boundary c to z
  padded = jnp.pad(states, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))  # [b, c, h, p, n] by boundary
  boundary_states = jnp.einsum("bhzc,bchpn->bzhpn", boundary_decay, padded)
  # 4. State -> output, the off-diagonal blocks: y_i += C_i . (decay(start -> i) h_in).
  y_off = jnp.einsum("bcihn,bchpn,bchi->bcihp", C, boundary_states[:, :-1], jnp.exp(a_cum))
  y = (y_diag + y_off).reshape(batch, seq, heads, -1)
  return y.astype(x.dtype), boundary_states[:, -1]


def _chunks(x, dt, A, B, C, doc, chunk):
  """The inputs padded to whole chunks and split into them, heads as (group, head in group).

  The tail is padded with dt = 0 and x = B = C = 0 (decay 1, no input: the state passes
  through unchanged) and joins the last document. Returns x `[b, c, l, g, r, p]` in x.dtype;
  B, C `[b, c, l, g, n]` in x.dtype; dt and a = dt * A `[b, c, g, r, l]` float32; doc
  `[b, c, l]`.
  """
  batch, seq, heads, head_dim = x.shape
  groups, d_state = B.shape[-2:]
  n_chunks = -(-seq // chunk)
  pad = n_chunks * chunk - seq
  if pad:
    zero_pad = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    x, dt, B, C = map(zero_pad, (x, dt, B, C))
    doc = jnp.pad(doc, ((0, 0), (0, pad)), mode="edge")
  by_chunk = lambda a, *rest: a.reshape(batch, n_chunks, chunk, *rest)
  x = by_chunk(x, groups, heads // groups, head_dim)
  B, C = (by_chunk(a.astype(x.dtype), groups, d_state) for a in (B, C))
  dt = jnp.moveaxis(by_chunk(dt.astype(f32), groups, heads // groups), 2, -1)
  a = dt * A.astype(f32).reshape(groups, heads // groups)[..., None]  # log-decay per step, <= 0
  return x, B, C, dt, a, by_chunk(doc)


def ssd_chunked(x, dt, A, B, C, *, chunk_size=256, segment_ids=None, initial_state=None):
  """The chunked SSD algorithm (Mamba-2, sec. 6): quadratic within chunks, a scan across them.

  Per chunk of `chunk_size` positions: (1) the intra-chunk output, an attention-like
  (C_i . B_j) * decay(j -> i) * dt_j matrix applied to x; (2) the state the chunk leaves behind
  from its own inputs; then (3) a scan over chunks carries states forward; (4) each chunk adds its
  incoming state's contribution, C_i . (decay(start -> i) * h_in).

  Precision: dt, A, every cumulative sum, decay and exponential, and the carried states are
  float32. The four big einsums (C.B, scores.x, x.B into states, C.h_in) take operands in x.dtype
  (the float32 decay-weighted factors and h_in are cast to it) and accumulate in float32; for
  float32 inputs that is all float32. y is cast to x.dtype at the end.

  Any seq: padded to whole chunks (`_chunks`: the state passes through), y sliced back.
  """
  check_shapes(x, dt, A, B, C)
  batch, seq, heads, head_dim = x.shape
  cdt = x.dtype
  doc = document_index(segment_ids, batch, seq)
  # Axes: b batch, c chunk, i/j/l position in chunk, g group, r head within group, p head_dim,
  # n d_state. Splitting heads as (g, r) lets B, C stay per group instead of being repeated.
  x, B, C, dt, a, doc = _chunks(x, dt, A, B, C, doc, chunk_size)

  # decay[..., i, j] = exp(sum of a over (j, i]) within one document, else 0.
  same_doc = (doc[..., :, None] == doc[..., None, :])[:, :, None, None]  # [b, c, 1, 1, i, j]
  decay = jnp.exp(_segment_sum(a, same_doc))  # [b, c, g, r, i, j]

  # (1) Intra-chunk, quadratic in L.
  scores = jnp.einsum("bcign,bcjgn->bcgij", C, B, preferred_element_type=f32)
  weights = (scores[:, :, :, None] * decay * dt[..., None, :]).astype(cdt)
  y = jnp.einsum("bcgrij,bcjgrp->bcigrp", weights, x, preferred_element_type=f32)

  # (2) Each chunk's own contribution to the state at its end. The last row of `decay` is the
  # decay from j to the chunk's end, already zero for j before a boundary inside the chunk.
  to_end = jnp.moveaxis(decay[..., -1, :] * dt, -1, 2)  # [b, c, l, g, r]
  x_to_end = (x.astype(f32) * to_end[..., None]).astype(cdt)
  chunk_states = jnp.einsum("bcjgrp,bcjgn->bcgrpn", x_to_end, B, preferred_element_type=f32)

  # Whether the state entering chunk c survives to position l: no boundary in between, i.e. l is
  # in the document of the previous chunk's last position (chunk 0: document 0, the initial
  # state's).
  doc_in = jnp.pad(doc[:, :-1, -1], ((0, 0), (1, 0)))  # [b, c]
  survives = (doc == doc_in[:, :, None])[:, :, None, None, :]  # [b, c, 1, 1, l]
  # A plain prefix sum is fine here: its error is relative to its own size.
  from_start = jnp.exp(jnp.cumsum(a, axis=-1)) * survives  # [b, c, g, r, l]

  # (3) Carry states across chunks, in float32, chunk-major for the scan.
  groups = B.shape[-2]
  state = None if initial_state is None else initial_state.astype(f32).reshape(
      batch, groups, heads // groups, head_dim, -1)
  chunk_major = lambda a: jnp.moveaxis(a, 1, 0)
  final_state, states_in = pass_states(chunk_major(from_start[..., -1]),
                                       chunk_major(chunk_states), state)
  states_in = chunk_major(states_in)  # [b, c, g, r, p, n]: the state entering each chunk

  # (4) The incoming state's contribution; the decay from chunk start is per (position, head), so
  # it scales the einsum's output instead of its operands.
  y_in = jnp.einsum("bcign,bcgrpn->bcigrp", C, states_in.astype(cdt), preferred_element_type=f32)
  y = y + y_in * jnp.moveaxis(from_start, -1, 2)[..., None]

  y = y.reshape(batch, -1, heads, head_dim)[:, :seq]
  return y.astype(cdt), final_state.reshape(batch, heads, head_dim, -1)


def _pallas(x, dt, A, B, C, *, chunk_size, segment_ids, initial_state):
  # On CPU there is no Pallas compiler: interpret mode (slow; for tests).
  return ssd_pallas(x, dt, A, B, C, chunk_size=chunk_size, segment_ids=segment_ids,
                    initial_state=initial_state, interpret=jax.default_backend() == "cpu")


IMPLS = {
    "chunked": ssd_chunked,
    "reference": ssd_reference,
    "pallas": _pallas,
}

# "auto" is "chunked" on every backend. The Pallas kernel passes its interpret-mode tests and
# lowers for Triton and Mosaic, but has no device table yet (bench/README.md): until it is taken
# the kernel is opt-in (MambaConfig.impl="pallas"), not the default.
SSD = Dispatch("ssd", IMPLS, auto="chunked", supports={"pallas": ssd_pallas_supports})


def ssd(x, dt, A, B, C, *, chunk_size=256, segment_ids=None, initial_state=None,
        impl="auto"):
  """Runs the SSD implementation named `impl` (a key of `IMPLS`, or "auto"); shapes as in the
  module doc. Returns (y, final_state). `chunk_size` only matters to chunked implementations.
  Fails naming the cause if `impl` is unknown or cannot take these inputs (`SSD.resolve`).
  """
  impl = SSD.resolve(impl, x, B, chunk_size=chunk_size)
  fn = IMPLS[impl]
  if impl != "reference":
    fn = functools.partial(fn, chunk_size=chunk_size)
  return fn(x, dt, A, B, C, segment_ids=segment_ids, initial_state=initial_state)
