"""What every SSD implementation shares: input checks, document starts, the zero state, heads
reading their group's B and C, and the scan that passes states from chunk to chunk.

The chunked implementations (`ssd.ssd_chunked`, `ssd_pallas`) and the sequence-sharded one
(`lcjax.parallel.ssd_sharded`) all split a row into runs (chunks, or pieces on devices), compute
each run's own final state from a zero start, and then pass states along the runs with
`pass_states`. Shapes are `lcjax.kernels.ssd`'s (see its module doc).
"""

import jax
import jax.numpy as jnp
from jax import lax

f32 = jnp.float32


def check_shapes(x, dt, A, B, C) -> None:
  """Fails naming the mismatch unless x, dt, A, B, C have `ssd`'s shapes."""
  batch, seq, heads, _ = x.shape
  groups = B.shape[-2]
  if dt.shape != (batch, seq, heads) or A.shape != (heads,):
    raise ValueError(f"dt {dt.shape} / A {A.shape} do not match x {x.shape}.")
  if B.shape != C.shape or B.shape[:2] != (batch, seq):
    raise ValueError(f"B {B.shape} / C {C.shape} do not match x {x.shape}.")
  if heads % groups:
    raise ValueError(f"heads={heads} is not a multiple of groups={groups}.")


def document_starts(segment_ids, batch: int, seq: int) -> jax.Array:
  """segment_ids `[batch, seq]` or None -> bool `[batch, seq]`: a document starts at t > 0 (the
  id changes). False at t = 0: the row's first document is the one an initial state continues."""
  if segment_ids is None:
    return jnp.zeros((batch, seq), bool)
  return jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))


def document_index(segment_ids, batch: int, seq: int) -> jax.Array:
  """segment_ids `[batch, seq]` or None -> int32 `[batch, seq]`: the number of document starts
  at or before t.

  Equal index <=> no boundary in between, even if an id recurs later in the row ([1, 2, 1]).
  The first document has index 0, the one the initial state belongs to.
  """
  return jnp.cumsum(document_starts(segment_ids, batch, seq), axis=1, dtype=jnp.int32)


def zero_state(x, B) -> jax.Array:
  """float32 zeros `[batch, heads, head_dim, d_state]` for x `[batch, seq, heads, head_dim]`."""
  batch, _, heads, head_dim = x.shape
  return jnp.zeros((batch, heads, head_dim, B.shape[-1]), f32)


def heads_from_groups(B, heads: int) -> jax.Array:
  """`[..., groups, d_state]` -> `[..., heads, d_state]`: head h reads h // (heads // groups)."""
  return jnp.repeat(B, heads // B.shape[-2], axis=-2)


def pass_states(decays, own_states, initial_state=None, resets=None):
  """The state entering each run (chunk or piece) of a row, and the state after the last.

  Over the leading axis k, the runs in row order:

      h_in[k] = 0 if resets[k] else h[k]        h[k + 1] = decays[k] * h_in[k] + own_states[k]

  from h[0] = initial_state. decays `[k, ...]`: the factor by which a state entering run k
  survives to its end (0 when a document starts inside it); own_states `[k, ..., p, n]`: the
  state run k leaves behind from its own inputs (from a zero state); resets `[k, ...]` bool, a
  leading part of decays' axes, or None: a document starts exactly at run k's first position.
  initial_state `[..., p, n]`; None: zeros like one own state (so inside `shard_map` they vary
  over the same mesh axes as the inputs, as the scan's carry must). All float32.

  Returns (h[last + 1] `[..., p, n]`, h_in `[k, ..., p, n]`). A sequential scan: over the few
  runs of a row it is cheap next to the per-run work, and clearer than the quadratic form.
  """
  state = jnp.zeros_like(own_states[0]) if initial_state is None else initial_state

  def step(state, inputs):
    decay, own, reset = inputs
    if reset is not None:
      reset = reset.reshape(reset.shape + (1,) * (state.ndim - reset.ndim))
      state = jnp.where(reset, 0.0, state)
    return decay[..., None, None] * state + own, state

  return lax.scan(step, state, (decays, own_states, resets))
