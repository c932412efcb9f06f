"""Cross-entropy of the LM head, plain and chunked over the sequence.

The plain loss (`cross_entropy`) builds the whole float32 `[batch, seq, vocab]` logits: at 128K
tokens and a 256K vocabulary that is 128 GiB per row. `chunked_cross_entropy` gives the same
losses and gradients while holding one chunk's `[batch, chunk, vocab]` logits at a time, in the
forward and in the backward: a `jax.custom_vjp` saves only the hidden states, the head and the
targets, and its backward recomputes each chunk's logits to get that chunk's share of the
gradients w.r.t. hidden and head.

Chunks are cut along the sequence with dynamic slices in a `fori_loop` (no reshape, so no copy
of the hidden states). A length that the chunk does not divide has a last chunk that starts
early, at seq - chunk, and overlaps the chunk before it; each token belongs to exactly one chunk
(the first that holds it), so the overlap is computed twice and counted once.

The head is `[d_model, vocab]`: an untied model's output matrix, or a tied model's embedding
table transposed (`LM.head_weights`); the same code serves both.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from jax import lax

f32 = jnp.float32


def logits(hidden: jax.Array, head: jax.Array) -> jax.Array:
  """hidden `[..., d]` (compute dtype), head `[d, vocab]` -> float32 logits `[..., vocab]`.

  The head is cast to the compute dtype; the matmul accumulates in float32 whatever that is.
  """
  return jnp.einsum("...d,dv->...v", hidden, head.astype(hidden.dtype),
                    preferred_element_type=f32)


def cross_entropy(hidden: jax.Array, head: jax.Array,
                  targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The reference: whole logits. hidden `[batch, seq, d]`, head `[d, vocab]`, targets
  `[batch, seq]` int -> (losses `[batch, seq]` float32, argmax predictions `[batch, seq]` int32).
  """
  z = logits(hidden, head)
  losses = optax.softmax_cross_entropy_with_integer_labels(z, targets)
  return losses, jnp.argmax(z, axis=-1).astype(jnp.int32)


def _chunk(i, seq: int, chunk: int):
  """Chunk i's start and which of its `chunk` tokens are its own `[chunk]` bool (all but the
  overlap of a last chunk that starts early)."""
  start = jnp.minimum(i * chunk, seq - chunk)
  return start, start + jnp.arange(chunk) >= i * chunk


def _take(x, start, chunk: int):
  """x `[batch, seq, ...]` -> its `[batch, chunk, ...]` slice at `start`."""
  return lax.dynamic_slice_in_dim(x, start, chunk, axis=1)


def _put(out, part, start, own):
  """Writes `part` `[batch, chunk, ...]` into `out` at `start`, only where the chunk owns the
  token (`own` `[chunk]`): the overlap keeps what the chunk before it wrote."""
  old = _take(out, start, part.shape[1])
  own = own.reshape(1, -1, *([1] * (part.ndim - 2)))
  return lax.dynamic_update_slice_in_dim(out, jnp.where(own, part, old), start, axis=1)


def _forward(hidden, head, targets, chunk: int):
  seq = hidden.shape[1]

  def body(i, out):
    start, own = _chunk(i, seq, chunk)
    part = cross_entropy(_take(hidden, start, chunk), head, _take(targets, start, chunk))
    return tuple(_put(o, p, start, own) for o, p in zip(out, part, strict=True))

  # zeros_like keeps shard_map's varying mesh axes of the inputs on the loop carry.
  out = (jnp.zeros_like(targets, dtype=f32), jnp.zeros_like(targets, dtype=jnp.int32))
  return lax.fori_loop(0, -(-seq // chunk), body, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(hidden, head, targets, chunk):
  return _forward(hidden, head, targets, chunk)


def _chunked_fwd(hidden, head, targets, chunk):
  return _forward(hidden, head, targets, chunk), (hidden, head, targets)


def _chunked_bwd(chunk, residuals, cotangents):
  """Per chunk: recompute its logits (the vjp of `cross_entropy` on the chunk), pull back the
  losses' cotangent of the tokens it owns, add its share of dhead (float32)."""
  hidden, head, targets = residuals
  dlosses = cotangents[0]  # predictions are integers: no cotangent
  seq = hidden.shape[1]

  def body(i, carry):
    dhidden, dhead = carry
    start, own = _chunk(i, seq, chunk)
    chunk_targets = _take(targets, start, chunk)
    _, vjp = jax.vjp(lambda h, w: cross_entropy(h, w, chunk_targets)[0],
                     _take(hidden, start, chunk), head)
    dh, dw = vjp(jnp.where(own, _take(dlosses, start, chunk), 0.0))
    return _put(dhidden, dh, start, own), dhead + dw.astype(f32)

  carry = (jnp.zeros_like(hidden), jnp.zeros_like(head, dtype=f32))
  dhidden, dhead = lax.fori_loop(0, -(-seq // chunk), body, carry)
  return dhidden, dhead.astype(head.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                          chunk: int) -> tuple[jax.Array, jax.Array]:
  """`cross_entropy`, `chunk` tokens of the sequence at a time (any seq: see the module doc).

  hidden `[batch, seq, d]`, head `[d, vocab]`, targets `[batch, seq]` int -> (losses
  `[batch, seq]` float32, predictions `[batch, seq]` int32). Differentiable w.r.t. hidden and
  head; neither pass holds more than `[batch, min(chunk, seq), vocab]` logits.
  """
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"chunk must be a positive int, got {chunk!r}.")
  return _chunked(hidden, head, targets, min(chunk, hidden.shape[1]))
