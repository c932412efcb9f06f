import jax.numpy as jnp
import numpy as np

from lcjax.models.rope import apply_rope, rope_angles

THETA = 10000.0


def rope_float64(x, positions, theta):
  """Rotate-half RoPE from the definition, in float64."""
  half = x.shape[-1] // 2
  angles = positions[..., None, None].astype(np.float64) * theta ** (-np.arange(half) / half)
  x1, x2 = x[..., :half].astype(np.float64), x[..., half:].astype(np.float64)
  return np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles),
                         x2 * np.cos(angles) + x1 * np.sin(angles)], axis=-1)


def test_angles_float32_at_large_positions():
  positions = (100_000 + np.arange(8) * 997)[None].astype(np.int32)
  sin, cos = rope_angles(jnp.asarray(positions), 64, THETA)
  assert sin.dtype == cos.dtype == jnp.float32 and sin.shape == (1, 8, 32)
  angles = positions[..., None].astype(np.float64) * THETA ** (-np.arange(32) / 32)
  # A float32 angle near 1e5 is exact to ~4e-3 rad; a bfloat16 one would be off by ~100 rad.
  np.testing.assert_allclose(sin, np.sin(angles), atol=1e-2)
  np.testing.assert_allclose(cos, np.cos(angles), atol=1e-2)


def test_bfloat16_inputs_rotated_in_float32(rng):
  positions = rng.integers(90_000, 110_000, size=(2, 8)).astype(np.int32)
  x = jnp.asarray(rng.standard_normal((2, 8, 3, 64)), jnp.bfloat16)
  out = apply_rope(x, jnp.asarray(positions), THETA)
  assert out.dtype == jnp.bfloat16
  expected = rope_float64(np.asarray(x, np.float64), positions, THETA)
  np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=6e-2)


def test_identity_at_position_zero(rng):
  x = rng.standard_normal((2, 5, 3, 16)).astype(np.float32)
  np.testing.assert_array_equal(apply_rope(x, jnp.zeros((2, 5), jnp.int32), THETA), x)


def test_scores_depend_only_on_relative_position(rng):
  q, k = rng.standard_normal((2, 1, 1, 1, 32)).astype(np.float32)
  m, n, shift = (int(i) for i in rng.integers(0, 2000, size=3))

  def score(m, n):
    rq = apply_rope(q, jnp.full((1, 1), m, jnp.int32), THETA)
    rk = apply_rope(k, jnp.full((1, 1), n, jnp.int32), THETA)
    return float(jnp.sum(rq * rk))

  np.testing.assert_allclose(score(m + shift, n + shift), score(m, n), atol=1e-3,
                             err_msg=f"m={m} n={n} shift={shift}")
