"""SSD: the scan reference against a float64 loop; the chunked forms, decoding steps and splits
against it.

Inputs are fresh every run (the `rng` fixture prints its seed); closeness and tolerances are
tests/numerics.py's. bfloat16 runs compare x, dt, B, C rounded to bf16 (einsum operands in bf16,
y rounded to bf16) with the float32 scan on the same rounded values.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.kernels.ssd import IMPLS, SSD, ssd, ssd_chunked, ssd_minimal, ssd_reference, ssd_step
from tests.numerics import BF16, BF16_GRAD, F32, F32_GRAD, assert_close, random_segments


def random_inputs(rng, batch=2, seq=64, heads=4, groups=2, head_dim=8, d_state=8,
                  initial_state=False):
  """(x, dt, A, B, C), initial_state: dt and A drawn as a Mamba-2 layer makes them."""
  x = rng.standard_normal((batch, seq, heads, head_dim)).astype(np.float32)
  # Per-head dt bias: inverse softplus of a log-uniform target in [1e-3, 1e-1], as at init.
  target = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), heads))
  dt_bias = np.log(np.expm1(target))
  dt = np.logaddexp(0.0, rng.standard_normal((batch, seq, heads)) + dt_bias).astype(np.float32)
  A = -np.exp(rng.uniform(0.0, np.log(16.0), heads)).astype(np.float32)
  B = rng.standard_normal((batch, seq, groups, d_state)).astype(np.float32)
  C = rng.standard_normal((batch, seq, groups, d_state)).astype(np.float32)
  h0 = None
  if initial_state:
    h0 = rng.standard_normal((batch, heads, head_dim, d_state)).astype(np.float32)
  return (x, dt, A, B, C), h0


def chunk_segments(rng, batch, seq, chunk):
  """Many short documents (some one token long), at least one boundary per row exactly on a
  chunk edge and others inside chunks; ids drawn from {0..3}, so padding (0) shows up between
  documents too and ids recur ([1, 2, 1] is three documents)."""
  return random_segments(rng, batch, seq, max_docs=min(seq, max(3, seq // 4)),
                         edges=np.arange(chunk, seq, chunk), recurring_ids=True)


def naive_ssd(x, dt, A, B, C, segment_ids, initial_state):
  """The recurrence one token at a time in float64, straight from the definition."""
  batch, seq, heads, head_dim = x.shape
  per_group = heads // B.shape[2]
  h = np.zeros((batch, heads, head_dim, B.shape[3]))
  if initial_state is not None:
    h = initial_state.astype(np.float64)
  y = np.zeros(x.shape)
  for b in range(batch):
    for t in range(seq):
      if t and segment_ids[b, t] != segment_ids[b, t - 1]:
        h[b] = 0
      for k in range(heads):
        g = k // per_group
        update = dt[b, t, k] * np.outer(x[b, t, k], B[b, t, g])
        h[b, k] = np.exp(dt[b, t, k] * A[k]) * h[b, k] + update
        y[b, t, k] = h[b, k] @ C[b, t, g]
  return y, h


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def run_with_grads(x, dt, A, B, C, initial_state, segment_ids, y_cotangent, state_cotangent, *,
                   impl, chunk_size):
  """(y, final_state) and the gradients of <y, y_cot> + <final, state_cot> w.r.t. all inputs."""
  def loss(x, dt, A, B, C, initial_state):
    y, final = ssd(x, dt, A, B, C, segment_ids=segment_ids, initial_state=initial_state,
                   impl=impl, chunk_size=chunk_size)
    total = jnp.sum(y.astype(jnp.float32) * y_cotangent) + jnp.sum(final * state_cotangent)
    return total, (y, final)

  (_, outputs), grads = jax.value_and_grad(loss, argnums=range(6), has_aux=True)(
      x, dt, A, B, C, initial_state)
  return outputs, grads


GRAD_NAMES = ("x", "dt", "A", "B", "C", "initial_state")


def compare_to_reference(rng, inputs, h0, seg, chunk, tol, grad_tol, cast=None):
  """Chunked on `cast(inputs)` vs the float32 scan on the same values, outputs and gradients."""
  cast_inputs = inputs if cast is None else tuple(cast(a) for a in inputs)
  exact = tuple(jnp.asarray(a, jnp.float32) for a in cast_inputs)
  x = inputs[0]
  y_cot = rng.standard_normal(x.shape).astype(np.float32)
  state_cot = rng.standard_normal((x.shape[0], x.shape[2], x.shape[3], inputs[3].shape[3]))
  state_cot = state_cot.astype(np.float32)
  (y, final), grads = run_with_grads(*cast_inputs, h0, seg, y_cot, state_cot, impl="chunked",
                                     chunk_size=chunk)
  (y_ref, final_ref), grads_ref = run_with_grads(*exact, h0, seg, y_cot, state_cot,
                                                 impl="reference", chunk_size=chunk)
  assert y.dtype == cast_inputs[0].dtype and final.dtype == jnp.float32
  assert_close(y, y_ref, tol, "y")
  assert_close(final, final_ref, tol, "final_state")
  for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref):
    if g_ref is not None:
      assert_close(g, g_ref, grad_tol, f"d/d{name}")


def test_reference_matches_float64_loop(rng):
  (x, dt, A, B, C), h0 = random_inputs(rng, seq=24, heads=4, groups=2, initial_state=True)
  seg = chunk_segments(rng, 2, 24, 8)
  y, final = jax.jit(ssd_reference)(x, dt, A, B, C, segment_ids=seg, initial_state=h0)
  y_naive, final_naive = naive_ssd(x, dt, A, B, C, seg, h0)
  assert_close(y, y_naive, 1e-5, "y")
  assert_close(final, final_naive, 1e-5, "final_state")


# seq, chunk, heads, groups, initial state, segments. Lengths on and off chunk multiples (and 1),
# groups 1 / some / one per head.
CASES = [
    (64, 16, 4, 1, False, False),
    (64, 64, 4, 2, True, False),
    (64, 8, 4, 4, True, True),
    (100, 16, 4, 2, True, True),
    (100, 64, 4, 1, False, True),
    (100, 8, 2, 2, False, False),
    (1, 8, 4, 2, True, False),
    (1, 16, 2, 1, False, True),
]


@pytest.mark.parametrize("seq,chunk,heads,groups,initial,segments", CASES)
def test_chunked_matches_reference(rng, seq, chunk, heads, groups, initial, segments):
  inputs, h0 = random_inputs(rng, seq=seq, heads=heads, groups=groups, initial_state=initial)
  seg = chunk_segments(rng, 2, seq, chunk) if segments else None
  compare_to_reference(rng, inputs, h0, seg, chunk, F32, F32_GRAD)


@pytest.mark.parametrize("seq,chunk,groups", [(64, 16, 2), (32, 32, 1), (48, 8, 4)])
def test_minimal_matches_reference(rng, seq, chunk, groups):
  """The teaching form (one document per row, zero initial state) against the scan: y, the final
  state and the gradients of a random projection of both."""
  inputs, _ = random_inputs(rng, seq=seq, groups=groups)
  x, B = inputs[0], inputs[3]
  y_cot = rng.standard_normal(x.shape).astype(np.float32)
  state_cot = rng.standard_normal(x.shape[:1] + x.shape[2:] + B.shape[-1:]).astype(np.float32)

  def value_and_grads(fn):
    def loss(*args):
      y, final = fn(*args)
      return jnp.sum(y * y_cot) + jnp.sum(final * state_cot), (y, final)
    return jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(*inputs)

  (_, (y, final)), grads = value_and_grads(functools.partial(ssd_minimal, chunk_size=chunk))
  (_, (y_ref, final_ref)), grads_ref = value_and_grads(ssd_reference)
  assert_close(y, y_ref, F32, "y")
  assert_close(final, final_ref, F32, "final_state")
  for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref):
    assert_close(g, g_ref, F32_GRAD, f"d/d{name}")


@pytest.mark.parametrize("seq,chunk,groups", [(64, 64, 1), (100, 16, 2)])
def test_chunked_bfloat16_inputs(rng, seq, chunk, groups):
  inputs, h0 = random_inputs(rng, seq=seq, groups=groups, initial_state=True)
  seg = chunk_segments(rng, 2, seq, chunk)
  bf16 = lambda a: jnp.asarray(a, jnp.bfloat16) if a.dtype == np.float32 and a.ndim > 1 else a
  compare_to_reference(rng, inputs, h0, seg, chunk, BF16, BF16_GRAD, cast=bf16)


def test_extreme_decays_stay_finite(rng):
  """dt * A down to -160 per step: decays underflow to exactly 0, never overflow or NaN."""
  (x, dt, A, B, C), h0 = random_inputs(rng, seq=40, initial_state=True)
  dt = dt * 100.0
  A = np.full_like(A, -16.0)
  compare_to_reference(rng, (x, dt, A, B, C), h0, None, 16, F32, F32_GRAD)


def test_steps_match_reference(rng):
  (x, dt, A, B, C), h0 = random_inputs(rng, seq=20, heads=4, groups=2, initial_state=True)

  @jax.jit
  def decode(h0, x, dt, B, C):
    def step(state, inputs):
      y, state = ssd_step(state, *inputs[:2], A, *inputs[2:])
      return state, y
    final, y = jax.lax.scan(step, h0, tuple(jnp.moveaxis(a, 1, 0) for a in (x, dt, B, C)))
    return jnp.moveaxis(y, 0, 1), final

  y, final = decode(h0, x, dt, B, C)
  y_ref, final_ref = jax.jit(ssd_reference)(x, dt, A, B, C, initial_state=h0)
  assert_close(y, y_ref, 1e-6, "y")
  assert_close(final, final_ref, 1e-6, "final_state")

  y_bf16, state = ssd_step(h0[:, :], x[:, 0].astype(jnp.bfloat16), dt[:, 0], A, B[:, 0], C[:, 0])
  assert y_bf16.dtype == jnp.bfloat16 and state.dtype == jnp.float32


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_packed_row_equals_documents_run_separately(rng, impl):
  seq, chunk = 48, 8
  (x, dt, A, B, C), h0 = random_inputs(rng, batch=1, seq=seq, initial_state=True)
  seg = chunk_segments(rng, 1, seq, chunk)
  run = jax.jit(functools.partial(ssd, impl=impl, chunk_size=chunk))
  y, final = run(x, dt, A, B, C, segment_ids=seg, initial_state=h0)

  # Each document alone, as one batch: left-aligned and zero-padded to seq (dt = 0 and zero
  # inputs leave the state alone), with the initial state for the first document only.
  starts = [0] + [t for t in range(1, seq) if seg[0, t] != seg[0, t - 1]] + [seq]
  spans = list(zip(starts[:-1], starts[1:]))
  def documents(a):
    return np.stack([np.pad(a[0, lo:hi], [(0, seq - hi + lo)] + [(0, 0)] * (a.ndim - 2))
                     for lo, hi in spans])
  h0_docs = np.zeros((len(spans),) + h0.shape[1:], np.float32)
  h0_docs[0] = h0[0]
  y_docs, final_docs = run(*map(documents, (x, dt)), A, *map(documents, (B, C)),
                           initial_state=h0_docs)
  for i, (lo, hi) in enumerate(spans):
    assert_close(y[:, lo:hi], y_docs[i:i + 1, :hi - lo], F32,
                 f"y of document [{lo}:{hi}] in {seg}")
  assert_close(final, final_docs[-1:], F32, "final_state")


def test_final_state_composes_across_splits(rng):
  """Running [0:k] then [k:seq] from the first part's final state equals running [0:seq].

  Row 0 is one document (no segment_ids semantics at play); row 1 is packed, and the split
  falls inside a document in one half of the runs and on a boundary in the other, where the
  caller contract is to pass no state on (the second run cannot see the boundary).
  """
  seq, chunk = 64, 16
  k = int(rng.integers(1, seq))
  (x, dt, A, B, C), h0 = random_inputs(rng, seq=seq, initial_state=True)
  seg = chunk_segments(rng, 2, seq, chunk)
  seg[:, k] = seg[:, k - 1]  # no boundary at k (one is made below, knowingly)
  seg[0] = 1
  on_boundary = rng.random() < 0.5
  if on_boundary:
    seg[1, k:] = np.where(seg[1, k:] == seg[1, k - 1], 4, seg[1, k:])
  run = jax.jit(functools.partial(ssd_chunked, chunk_size=chunk))
  y, final = run(x, dt, A, B, C, segment_ids=seg, initial_state=h0)

  part = lambda a, s: a if a.ndim == 1 else a[:, s]
  first, second = slice(0, k), slice(k, seq)
  y1, mid = run(*(part(a, first) for a in (x, dt, A, B, C)), segment_ids=seg[:, first],
                initial_state=h0)
  if on_boundary:
    mid = mid.at[1].set(0.0)
  y2, final2 = run(*(part(a, second) for a in (x, dt, A, B, C)), segment_ids=seg[:, second],
                   initial_state=mid)
  what = f"split at {k}, on a boundary: {on_boundary}, segment_ids={seg}"
  assert_close(jnp.concatenate([y1, y2], axis=1), y, F32, f"y, {what}")
  assert_close(final2, final, F32, f"final_state, {what}")


def test_dispatch(rng):
  (x, dt, A, B, C), _ = random_inputs(rng, batch=1, seq=8, heads=2, groups=1)
  assert set(IMPLS) == {"chunked", "reference", "pallas"}
  y, final = ssd(x, dt, A, B, C, impl="reference")
  y_ref, final_ref = ssd_reference(x, dt, A, B, C)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(final, final_ref)
  with pytest.raises(ValueError, match=r"'auto', 'chunked', 'pallas', 'reference'"):
    ssd(x, dt, A, B, C, impl="triton")
  assert SSD.resolve("auto") == "chunked"
  with pytest.raises(ValueError, match="'pallas' cannot run these inputs: .*power of two"):
    ssd(x, dt, A, B, C, impl="pallas", chunk_size=48)
