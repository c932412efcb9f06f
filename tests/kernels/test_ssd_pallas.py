"""Pallas SSD, run in Pallas's interpreter on CPU, against the scan reference and `ssd_chunked`.

Inputs are fresh every run, drawn as in test_ssd.py (whose input helpers this reuses), with the
tolerances of tests/numerics.py (the matmul operands are bf16 the same way as ssd_chunked's):
forward y and final_state, and the gradients of a random projection of both w.r.t. x, dt, A, B,
C and initial_state. The GPU code path runs everywhere below; the TPU path (shifted-add window
sums, head-major arrays, row vectors) runs in both interpreters in the slow test. Neither Triton
nor Mosaic compiles here, but `test_lowers_for_gpu_and_tpu` runs both lowerings, which catch
unsupported ops and block shapes.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from lcjax.kernels.ssd import ssd_chunked, ssd_reference
from lcjax.kernels.ssd_pallas import ssd_pallas, supports
from tests.kernels.test_ssd import chunk_segments, random_inputs
from tests.numerics import BF16, BF16_GRAD, F32, F32_GRAD, assert_close

DIMS = dict(heads=4, head_dim=16, d_state=16)
GRAD_NAMES = ("x", "dt", "A", "B", "C", "initial_state")


@functools.partial(jax.jit, static_argnames=("fn",))
def run_with_grads(x, dt, A, B, C, initial_state, segment_ids, y_cot, state_cot, *, fn):
  """(y, final_state) and the gradients of <y, y_cot> + <final, state_cot> w.r.t. all inputs."""
  def loss(x, dt, A, B, C, initial_state):
    y, final = fn(x, dt, A, B, C, segment_ids=segment_ids, initial_state=initial_state)
    return jnp.sum(y.astype(jnp.float32) * y_cot) + jnp.sum(final * state_cot), (y, final)

  (_, outputs), grads = jax.value_and_grad(loss, argnums=range(6), has_aux=True)(
      x, dt, A, B, C, initial_state)
  return outputs, grads


def compare(rng, inputs, h0, seg, chunk, tol, grad_tol, cast=None, against_chunked=False,
            **pallas_kwargs):
  """ssd_pallas on `cast(inputs)` vs the float32 scan on the same values (outputs, gradients),
  and optionally vs ssd_chunked on the same inputs (outputs)."""
  inputs = inputs if cast is None else tuple(cast(a) for a in inputs)
  exact = tuple(jnp.asarray(a, jnp.float32) for a in inputs)
  x, B = inputs[0], inputs[3]
  y_cot = rng.standard_normal(x.shape).astype(np.float32)
  state_cot = rng.standard_normal(x.shape[:1] + x.shape[2:] + B.shape[-1:]).astype(np.float32)
  pallas_kwargs.setdefault("interpret", True)
  pallas = functools.partial(ssd_pallas, chunk_size=chunk, **pallas_kwargs)
  (y, final), grads = run_with_grads(*inputs, h0, seg, y_cot, state_cot, fn=pallas)
  (y_ref, final_ref), grads_ref = run_with_grads(*exact, h0, seg, y_cot, state_cot,
                                                 fn=ssd_reference)
  assert y.dtype == x.dtype and final.dtype == jnp.float32
  assert_close(y, y_ref, tol, "y")
  assert_close(final, final_ref, tol, "final_state")
  for name, primal, g, g_ref in zip(GRAD_NAMES, inputs + (h0,), grads, grads_ref):
    if g_ref is not None:
      assert g.dtype == primal.dtype, name
      assert_close(g, g_ref, grad_tol, f"d/d{name}")
  if not against_chunked:
    return
  y_chunked, final_chunked = jax.jit(functools.partial(ssd_chunked, chunk_size=chunk))(
      *inputs, segment_ids=seg, initial_state=h0)
  assert_close(y, y_chunked, tol, "y vs chunked")
  assert_close(final, final_chunked, tol, "final_state vs chunked")


# seq, chunk, groups, initial state, segments. Lengths on and off chunk multiples and shorter than
# one chunk; groups 1 / some / one per head. chunk_segments puts boundaries inside chunks and at
# least one on a chunk edge per row.
CASES = [
    (64, 16, 1, False, False),
    (64, 32, 2, True, True),
    (50, 16, 4, True, True),
    (5, 16, 2, False, True),
    pytest.param(40, 32, 2, False, True, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("seq,chunk,groups,initial,segments", CASES)
def test_matches_reference(rng, seq, chunk, groups, initial, segments):
  inputs, h0 = random_inputs(rng, seq=seq, groups=groups, initial_state=initial, **DIMS)
  seg = chunk_segments(rng, 2, seq, chunk) if segments else None
  compare(rng, inputs, h0, seg, chunk, F32, F32_GRAD, against_chunked=True)


def _bf16(a):
  return jnp.asarray(a, jnp.bfloat16) if a.dtype == np.float32 and a.ndim > 1 else a


@pytest.mark.parametrize("seq,chunk,groups", [
    (64, 16, 2),
    pytest.param(50, 32, 1, marks=pytest.mark.slow),
])
def test_bfloat16_inputs(rng, seq, chunk, groups):
  """bf16 x, dt, B, C vs the float32 scan on the same rounded values (seen: <= 5e-3)."""
  inputs, h0 = random_inputs(rng, seq=seq, groups=groups, initial_state=True, **DIMS)
  seg = chunk_segments(rng, 2, seq, chunk)
  compare(rng, inputs, h0, seg, chunk, BF16, BF16_GRAD, cast=_bf16)


def test_extreme_decays_stay_finite(rng):
  """dt * A down to -160 per step: decays underflow to exactly 0, never overflow or NaN."""
  (x, dt, A, B, C), h0 = random_inputs(rng, seq=40, initial_state=True, **DIMS)
  dt = dt * 100.0
  A = np.full_like(A, -16.0)
  seg = chunk_segments(rng, 2, 40, 16)
  compare(rng, (x, dt, A, B, C), h0, seg, 16, F32, F32_GRAD)


@pytest.mark.slow
@pytest.mark.parametrize("interpret", ["generic", "tpu"])
def test_tpu_code_path(rng, interpret):
  """backend="tpu": head-major layout and shifted-add window sums, in Pallas's generic
  interpreter and in its TPU interpreter (which also checks reads of unwritten memory)."""
  seq, chunk = 200, 128  # Mosaic needs chunks of 128s
  inputs, h0 = random_inputs(rng, batch=1, seq=seq, groups=2, initial_state=True, **DIMS)
  seg = chunk_segments(rng, 1, seq, chunk)
  params = True if interpret == "generic" else pltpu.InterpretParams()
  compare(rng, inputs, h0, seg, chunk, F32, F32_GRAD, backend="tpu", interpret=params)


@pytest.mark.parametrize("platform,backend,chunk", [("cuda", "gpu", 64), ("tpu", "tpu", 128)])
def test_lowers_for_gpu_and_tpu(platform, backend, chunk):
  """Forward and backward lower to Triton / Mosaic for model-sized tiles (no compile: no device)."""
  batch, seq, heads, groups, head_dim, d_state = 1, 300, 4, 2, 64, 128
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
  args = (shape(batch, seq, heads, head_dim), shape(batch, seq, heads, dtype=jnp.float32),
          shape(heads, dtype=jnp.float32), shape(batch, seq, groups, d_state),
          shape(batch, seq, groups, d_state), shape(batch, heads, head_dim, d_state,
                                                    dtype=jnp.float32),
          shape(batch, seq, dtype=jnp.int32))

  def loss(x, dt, A, B, C, h0, seg):
    y, final = ssd_pallas(x, dt, A, B, C, chunk_size=chunk, segment_ids=seg, initial_state=h0,
                          backend=backend)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(final)

  lowered = jax.jit(jax.grad(loss, argnums=range(6))).trace(*args).lower(
      lowering_platforms=(platform,))
  text = lowered.as_text()
  for name in ("ssd_chunk_states", "ssd_chunk_outputs", "ssd_chunk_outputs_bwd",
               "ssd_chunk_states_bwd"):
    assert name in text, name


def test_supports():
  x = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
  B = jnp.zeros((1, 8, 1, 128), jnp.bfloat16)
  assert supports(x, B, chunk_size=64, backend="gpu") is None
  assert supports(x, B, chunk_size=256, backend="tpu") is None
  assert "power of two" in supports(x, B, chunk_size=48, backend="gpu")
  assert "head_dim" in supports(x[..., :48], B, chunk_size=64, backend="gpu")
  assert "multiple of 128" in supports(x, B, chunk_size=64, backend="tpu")
  assert "float32 or bfloat16" in supports(x.astype(jnp.float16), B, chunk_size=64, backend="gpu")
  assert "unknown backend" in supports(x, B, chunk_size=64, backend="cuda")
  with pytest.raises(ValueError, match="multiple of 128"):
    ssd_pallas(x, jnp.ones((1, 8, 2)), -jnp.ones(2), B, B, chunk_size=64, backend="tpu")
