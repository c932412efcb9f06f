"""What every reference-vs-fast comparison shares: one closeness check, the tolerances by dtype,
and the random inputs (packed documents, GQA shapes).

Closeness is relative to the largest value: max|actual - expected| / max|expected| over the
finite entries, with -inf required exactly where expected has it (lse of a query that sees
nothing). A scale-free check does not flake on tiny entries next to large ones; a wrong mask,
decay or reset gives errors of order 1.

Seeds: the `rng` fixture (tests/conftest.py) draws a fresh seed every run and prints it; set
LCJAX_SEED=<seed> to replay a failure.
"""

import jax.numpy as jnp
import numpy as np

# The same computation in another order, float32 throughout (seen: <= 7e-7 forward).
F32 = 1e-5
# float32 gradients that sum over every position (SSD's dA most of all; seen up to 3e-5).
F32_GRAD = 1e-4
# bfloat16 inputs against float32 on the same rounded values: a few bf16 ulps (epsilon 7.8e-3;
# seen <= 7e-3 forward and for attention gradients).
BF16 = 2e-2
# bfloat16 gradients that sum rounded terms over every position (SSD's dA; seen up to 3.4e-2).
BF16_GRAD = 6e-2

TOLERANCES = {"float32": F32, "bfloat16": BF16}


def tolerance(dtype, *, grad_sum: bool = False) -> float:
  """The tolerance for outputs computed in `dtype`; grad_sum: gradients summed over positions."""
  name = jnp.dtype(dtype).name
  if grad_sum:
    return {"float32": F32_GRAD, "bfloat16": BF16_GRAD}[name]
  return TOLERANCES[name]


def assert_close(actual, expected, tol: float, what: str = "") -> None:
  """Relative-to-max closeness (see the module doc); -inf must match exactly."""
  actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected), err_msg=what)
  finite = np.isfinite(expected)
  actual, expected = actual[finite], expected[finite]
  assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
  err = np.abs(actual - expected).max(initial=0.0) / max(np.abs(expected).max(initial=0.0), 1e-30)
  assert err <= tol, f"{what}: relative-to-max error {err:.3g} > {tol:.3g}"


def random_segments(rng, batch: int, seq: int, *, max_docs: int = 4, edges=(),
                    padding: bool = True, recurring_ids: bool = False) -> np.ndarray:
  """int32 `[batch, seq]` packed rows: 1..max_docs documents of random lengths (some of length
  1), ids 1, 2, ... in order.

  edges: positions (chunk or shard edges) of which one, per row, is made a boundary, so
  documents cross and start exactly at edges. padding: the last document sometimes becomes
  padding (id 0). recurring_ids: ids are drawn from {0..3} at each boundary instead, so ids recur
  ([1, 2, 1] is three documents) and padding shows up between documents too.
  """
  rows = []
  for _ in range(batch):
    cuts = rng.choice(np.arange(1, seq), size=rng.integers(0, max_docs), replace=False)
    if len(edges):
      cuts = np.append(cuts, rng.choice(np.asarray(edges)))
    cuts = np.unique(cuts)
    doc = np.searchsorted(cuts, np.arange(seq), side="right")  # 0, 1, ... per document
    if recurring_ids:
      ids = np.cumsum(rng.integers(1, 4, size=len(cuts) + 1)) + rng.integers(0, 4)
      row = (ids % 4)[doc]
    else:
      row = doc + 1
      if padding and len(cuts) and rng.random() < 0.5:
        row[cuts[-1]:] = 0
    rows.append(row)
  return np.stack(rows).astype(np.int32)


def positions_of(segment_ids: np.ndarray) -> np.ndarray:
  """Position of each token within its document (restarting at every id change)."""
  pos = np.zeros_like(segment_ids)
  for b, row in enumerate(segment_ids):
    for t in range(1, len(row)):
      pos[b, t] = 0 if row[t] != row[t - 1] else pos[b, t - 1] + 1
  return pos


def random_qkv(rng, batch: int = 2, q_seq: int = 37, kv_seq: int | None = None, heads: int = 4,
               kv_heads: int = 2, head_dim: int = 8, dtype=jnp.float32):
  """q `[batch, q_seq, heads, head_dim]`, k, v `[batch, kv_seq, kv_heads, head_dim]`."""
  kv_seq = q_seq if kv_seq is None else kv_seq
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  return (draw(batch, q_seq, heads, head_dim), draw(batch, kv_seq, kv_heads, head_dim),
          draw(batch, kv_seq, kv_heads, head_dim))
