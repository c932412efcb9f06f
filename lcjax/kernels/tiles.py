"""The tile math of flash attention, shared by the blockwise kernel, the Pallas kernels and ring
attention: the online softmax, merging partial results by their log-sum-exp, the recomputed
probabilities and score gradients of the backward, and how token rows are padded to blocks.

Shapes: a tile is q `[..., rows, d]` against k, v `[..., bk, d]` with the same leading dims
(none in the Pallas kernels; batch and kv head in the blockwise kernel, whose rows are a query
block of each head of a group). Row statistics (m, l, lse, delta) are `[..., rows, w]`: w = 1,
or 128 replicated lanes in the Pallas TPU kernels, which `widen` cuts or tiles to a tile's width.
Matmuls accumulate in float32; operands keep the dtype they are given.
"""

import jax
import jax.numpy as jnp
from jax import lax

from lcjax.kernels.mask import FAR, Tokens

f32 = jnp.float32
# Segment ids of padding tokens: they differ from each other and from real ids (>= 0), so
# padding is never seen and sees nothing.
PAD_QUERY, PAD_KEY = -1, -2


def _batch_dims(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(x.ndim - 2))


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """a `[..., m, k]`, b `[..., n, k]` -> a @ b^T `[..., m, n]` float32."""
  last, batch = (a.ndim - 1,), _batch_dims(a)
  return lax.dot_general(a, b, ((last, last), (batch, batch)), preferred_element_type=f32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
  """a `[..., m, k]` (cast to b's dtype), b `[..., k, n]` -> a @ b `[..., m, n]` float32."""
  batch = _batch_dims(a)
  return lax.dot_general(a.astype(b.dtype), b, (((a.ndim - 1,), (b.ndim - 2,)), (batch, batch)),
                         preferred_element_type=f32)


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
  """a `[..., n, m]` (cast to b's dtype), b `[..., n, d]` -> a^T @ b `[..., m, d]` float32."""
  return dot_nn(jnp.swapaxes(a, -1, -2), b)


def widen(x: jax.Array, n: int) -> jax.Array:
  """`[..., rows, w]` -> `[..., rows, n]`: broadcast a column, or cut / tile replicated lanes."""
  w = x.shape[-1]
  if w == 1 or w == n:
    return jnp.broadcast_to(x, (*x.shape[:-1], n))
  return x[..., :n] if n < w else jnp.tile(x, (1,) * (x.ndim - 1) + (n // w,))


def scores(q: jax.Array, k: jax.Array, scale: float, mask: jax.Array) -> jax.Array:
  """q `[..., rows, d]`, k `[..., bk, d]` -> float32 scores `[..., rows, bk]`, -inf where
  `mask` (broadcasting to them) is False."""
  return jnp.where(mask, dot_nt(q, k) * scale, -jnp.inf)


def softmax_step(s, v, m, l, acc):
  """One kv tile of the online softmax: masked scores s `[..., rows, bk]`, v `[..., bk, d]`;
  state m, l `[..., rows, w]`, acc `[..., rows, d]` float32 -> the new state.

  m stays -inf for rows that have seen nothing yet; they shift by 0 so no -inf - -inf appears.
  """
  m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
  shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.exp(s - widen(shift, s.shape[-1]))
  alpha = jnp.exp(m - shift)  # 0 while m = -inf
  l = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
  return m_new, l, widen(alpha, acc.shape[-1]) * acc + dot_nn(p, v)


def softmax_finish(m, l, acc):
  """-> out `[..., rows, d]` float32 (0 where nothing was seen), lse like m (-inf there)."""
  seen = l > 0
  safe_l = jnp.where(seen, l, 1.0)
  out = acc * widen(jnp.where(seen, 1.0 / safe_l, 0.0), acc.shape[-1])
  return out, jnp.where(seen, m + jnp.log(safe_l), -jnp.inf)


def merge(out_a, lse_a, out_b, lse_b):
  """(out `[..., rows, d]` float32, lse `[..., rows, 1]`) of two disjoint sets of keys -> those
  of their union."""
  lse = jnp.logaddexp(lse_a, lse_b)  # -inf where neither saw anything
  safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  return jnp.exp(lse_a - safe) * out_a + jnp.exp(lse_b - safe) * out_b, lse


def delta(out: jax.Array, dout: jax.Array, dlse: jax.Array | None) -> jax.Array:
  """rowsum(dout * out) - dlse, float32 `[batch, heads, q_seq]` from out, dout `[batch, q_seq,
  heads, d]` and dlse (None: zero) `[batch, heads, q_seq]`: with it dS = P * (dP - delta), as
  d lse / dS = P."""
  d = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1).swapaxes(1, 2)
  return d if dlse is None else d - dlse.astype(f32)


def probs_and_dscores(q, k, v, do, lse, delta, mask, scale):
  """The flash backward of a tile: -> P and dL/d(q.k) (the scale applied), both float32
  `[..., rows, bk]`. q, do `[..., rows, d]`; k, v `[..., bk, d]`; lse, delta `[..., rows, w]`.

  lse is given (it may be a larger attention's): P = exp(s - lse), zero where masked or where
  lse = -inf (the row sees nothing anywhere).
  """
  s = dot_nt(q, k) * scale
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
  p = jnp.where(mask, jnp.exp(s - widen(lse, s.shape[-1])), 0.0)
  dp = dot_nt(do, v)
  return p, p * (dp - widen(delta, s.shape[-1])) * scale


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  """Pads `axis` at the end to `size` with `value` (no-op if it is that long)."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value) if size > x.shape[axis] else x


def pad_tokens(tokens: Tokens, size: int, *, is_kv: bool) -> Tokens:
  """Tokens `[batch, seq]` padded to `[batch, size]` int32 with tokens no real one sees or is
  seen by (segments PAD_QUERY, PAD_KEY). Padded keys also sit after every query (index FAR) and
  are no sinks; `block_ranges(..., length=seq)` leaves padding out of the blocks' ranges."""
  segment, index, position = (PAD_KEY, FAR, FAR) if is_kv else (PAD_QUERY, -1, 0)
  return Tokens(*(pad_axis(x.astype(jnp.int32), 1, size, value) for x, value in
                  zip(tokens, (segment, index, position))))
