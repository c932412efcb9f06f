"""Mamba-2 state-space duality (SSD): the scan reference, the chunked form, one decoding step.

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

from lcjax.kernels.ssd_pallas import ssd_pallas
from lcjax.kernels.ssd_pallas import supports as ssd_pallas_supports

f32 = jnp.float32


def _check_shapes(x, dt, A, B, C):
  batch, seq, heads, _ = x.shape
  groups = B.shape[-2]
  if dt.shape != (batch, seq, heads) or A.shape != (heads,):
    raise ValueError(f"dt {dt.shape} / A {A.shape} do not match x {x.shape}.")
  if B.shape != C.shape or B.shape[:2] != (batch, seq):
    raise ValueError(f"B {B.shape} / C {C.shape} do not match x {x.shape}.")
  if heads % groups:
    raise ValueError(f"heads={heads} is not a multiple of groups={groups}.")


def _document_index(segment_ids, batch, seq):
  """`[batch, seq]` -> int32 `[batch, seq]`: the number of boundaries at or before t.

  Equal index <=> no boundary in between, even if an id recurs later in the row ([1, 2, 1]).
  The first document has index 0, the one the initial state belongs to.
  """
  if segment_ids is None:
    return jnp.zeros((batch, seq), jnp.int32)
  starts = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
  return jnp.pad(jnp.cumsum(starts, axis=1), ((0, 0), (1, 0)))


def _zeros_state(x, B):
  batch, _, heads, head_dim = x.shape
  return jnp.zeros((batch, heads, head_dim, B.shape[-1]), f32)


def _heads_from_groups(B, heads):
  """`[..., groups, d_state]` -> `[..., heads, d_state]`: head h reads h // (heads // groups)."""
  return jnp.repeat(B, heads // B.shape[-2], axis=-2)


def ssd_step(state, x, dt, A, B, C):
  """One token of the recurrence, for decoding.

  state `[batch, heads, head_dim, d_state]`; x `[batch, heads, head_dim]`; dt `[batch, heads]`;
  A `[heads]`; B, C `[batch, groups, d_state]`. Returns (y `[batch, heads, head_dim]` in x.dtype,
  new_state float32). Document starts are the caller's: pass a zero state at one.
  """
  heads = x.shape[1]
  dt = dt.astype(f32)
  B = _heads_from_groups(B.astype(f32), heads)
  C = _heads_from_groups(C.astype(f32), heads)
  decay = jnp.exp(dt * A.astype(f32))[..., None, None]
  update = (dt[..., None] * x.astype(f32))[..., None] * B[:, :, None, :]
  new_state = decay * state.astype(f32) + update
  y = jnp.einsum("bhpn,bhn->bhp", new_state, C)
  return y.astype(x.dtype), new_state


def ssd_reference(x, dt, A, B, C, *, segment_ids=None, initial_state=None):
  """`lax.scan` over time of exactly the recurrence, all in float32. O(seq) sequential steps."""
  _check_shapes(x, dt, A, B, C)
  batch, seq = x.shape[:2]
  state = _zeros_state(x, B) if initial_state is None else initial_state.astype(f32)
  doc = _document_index(segment_ids, batch, seq)
  starts = jnp.pad(doc[:, 1:] != doc[:, :-1], ((0, 0), (1, 0)))  # [batch, seq] bool

  def step(state, inputs):
    x_t, dt_t, B_t, C_t, start_t = inputs
    state = jnp.where(start_t[:, None, None, None], 0.0, state)
    y_t, state = ssd_step(state, x_t.astype(f32), dt_t, A, B_t, C_t)
    return state, y_t

  time_major = lambda a: jnp.moveaxis(a, 1, 0)
  final_state, y = lax.scan(step, state, tuple(map(time_major, (x, dt, B, C, starts))))
  return time_major(y).astype(x.dtype), final_state


def _segment_sum(a, same_doc):
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

  Any seq: the tail is padded with dt = 0 and x = B = C = 0 (decay 1, no input: the state passes
  through unchanged), and y is sliced back.
  """
  _check_shapes(x, dt, A, B, C)
  batch, seq, heads, head_dim = x.shape
  groups, d_state = B.shape[-2:]
  per_group = heads // groups
  cdt = x.dtype
  L = chunk_size
  n_chunks = -(-seq // L)
  pad = n_chunks * L - seq

  doc = _document_index(segment_ids, batch, seq)
  if pad:
    zero_pad = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    x, dt, B, C = map(zero_pad, (x, dt, B, C))
    doc = jnp.pad(doc, ((0, 0), (0, pad)), mode="edge")  # padding joins the last document

  # Axes: b batch, c chunk, i/j/l position in chunk, g group, r head within group, p head_dim,
  # n d_state. Splitting heads as (g, r) lets B, C stay per group instead of being repeated.
  x = x.reshape(batch, n_chunks, L, groups, per_group, head_dim)
  B = B.reshape(batch, n_chunks, L, groups, d_state).astype(cdt)
  C = C.reshape(batch, n_chunks, L, groups, d_state).astype(cdt)
  dt = dt.astype(f32).reshape(batch, n_chunks, L, groups, per_group)
  dt = jnp.moveaxis(dt, 2, -1)  # [b, c, g, r, l]
  a = dt * A.astype(f32).reshape(groups, per_group)[..., None]  # log-decay per step, <= 0
  doc = doc.reshape(batch, n_chunks, L)

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

  # (3) Carry states across chunks, in float32. A sequential scan over n_chunks is cheap next to
  # the per-chunk einsums and clearer than the quadratic-over-chunks form.
  if initial_state is None:
    state = jnp.zeros((batch, groups, per_group, head_dim, d_state), f32)
  else:
    state = initial_state.astype(f32).reshape(batch, groups, per_group, head_dim, d_state)

  def carry(state, inputs):
    chunk_decay, own_state = inputs
    return chunk_decay[..., None, None] * state + own_state, state

  chunk_decays = from_start[..., -1]  # [b, c, g, r]
  final_state, states_in = lax.scan(
      carry, state, (jnp.moveaxis(chunk_decays, 1, 0), jnp.moveaxis(chunk_states, 1, 0)))
  states_in = jnp.moveaxis(states_in, 0, 1)  # [b, c, g, r, p, n]: state entering each chunk

  # (4) The incoming state's contribution; the decay from chunk start is per (position, head), so
  # it scales the einsum's output instead of its operands.
  y_in = jnp.einsum("bcign,bcgrpn->bcigrp", C, states_in.astype(cdt), preferred_element_type=f32)
  y = y + y_in * jnp.moveaxis(from_start, -1, 2)[..., None]

  y = y.reshape(batch, n_chunks * L, heads, head_dim)[:, :seq]
  return y.astype(cdt), final_state.reshape(batch, heads, head_dim, d_state)


def _pallas(x, dt, A, B, C, *, chunk_size, segment_ids, initial_state):
  # On CPU there is no Pallas compiler: interpret mode (slow; for tests).
  return ssd_pallas(x, dt, A, B, C, chunk_size=chunk_size, segment_ids=segment_ids,
                    initial_state=initial_state, interpret=jax.default_backend() == "cpu")


IMPLS = {
    "chunked": ssd_chunked,
    "reference": ssd_reference,
    "pallas": _pallas,
}

# What "auto" runs on each backend. The Pallas kernel passes its interpret-mode tests and lowers
# for Triton and Mosaic, but has not yet been run on a GPU or TPU (bench/README.md): until its
# device table is taken it is opt-in (ssd_impl="pallas"), not the default.
AUTO = {"cpu": "chunked", "gpu": "chunked", "tpu": "chunked"}


def resolve_impl(impl: str, x=None, B=None, chunk_size=None) -> str:
  """The implementation to run for `impl` ("auto": the backend's choice in AUTO). Fails,
  naming the cause, if `impl` is unknown or is "pallas" and the kernel cannot take the shapes."""
  if impl == "auto":
    impl = AUTO.get(jax.default_backend(), "chunked")
  if impl not in IMPLS:
    raise ValueError(f"Unknown ssd impl {impl!r}; choose one of {['auto'] + sorted(IMPLS)}.")
  if impl == "pallas" and x is not None:
    reason = ssd_pallas_supports(x, B, chunk_size=chunk_size)
    if reason:
      raise ValueError(f"ssd_impl='pallas' cannot run these shapes: {reason} Choose another "
                       f"ssd_impl (e.g. 'auto').")
  return impl


def ssd(x, dt, A, B, C, *, chunk_size=256, segment_ids=None, initial_state=None,
        impl="auto"):
  """Runs the SSD implementation named `impl` (a key of `IMPLS`, or "auto"); shapes as in the
  module doc. Returns (y, final_state). `chunk_size` only matters to chunked implementations.
  """
  impl = resolve_impl(impl, x, B, chunk_size)
  fn = IMPLS[impl]
  if impl != "reference":
    fn = functools.partial(fn, chunk_size=chunk_size)
  return fn(x, dt, A, B, C, segment_ids=segment_ids, initial_state=initial_state)
