"""The chunked cross-entropy against the plain one: values, predictions, gradients w.r.t. the
hidden states and the head, remainders, and the memory it saves (compiled, not run)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.kernels.losses import chunked_cross_entropy, cross_entropy
from lcjax.models.loss import AUTO_LOGITS_BYTES, chunk_length
from tests.numerics import BF16, BF16_GRAD, F32_GRAD, assert_close

# Forward losses: the same per-token arithmetic in another batching of the matmul.
F32_LOSS = 1e-6


def inputs(rng, batch=2, seq=37, d=16, vocab=50, dtype=jnp.float32):
  hidden = jnp.asarray(rng.standard_normal((batch, seq, d)), dtype)
  head = jnp.asarray(rng.standard_normal((d, vocab)) * 0.5, jnp.float32)
  targets = jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)
  # Random per-token weights, some zero: what loss_weights do to the cotangent.
  weights = jnp.asarray(rng.random((batch, seq)) * (rng.random((batch, seq)) > 0.2), jnp.float32)
  return hidden, head, targets, weights


@functools.partial(jax.jit, static_argnums=0)
def loss_and_grads(loss_fn, hidden, head, targets, weights):
  def weighted(hidden, head):
    losses, predictions = loss_fn(hidden, head, targets)
    return jnp.sum(losses * weights), (losses, predictions)
  (_, (losses, predictions)), grads = jax.value_and_grad(weighted, argnums=(0, 1),
                                                         has_aux=True)(hidden, head)
  return losses, predictions, grads


def chunked(chunk):
  return functools.partial(chunked_cross_entropy, chunk=chunk)


# 37 tokens: chunks of 5 and 8 leave a remainder (the last chunk overlaps), 37 is one chunk, 64
# is longer than the row, 1 is a loop over every token.
@pytest.mark.parametrize("chunk", [1, 5, 8, 37, 64])
def test_chunked_equals_plain(rng, chunk):
  args = inputs(rng)
  want_losses, want_predictions, (want_dh, want_dw) = loss_and_grads(cross_entropy, *args)
  losses, predictions, (dh, dw) = loss_and_grads(chunked(chunk), *args)
  assert losses.dtype == jnp.float32 and predictions.dtype == jnp.int32
  assert_close(losses, want_losses, F32_LOSS, "losses")
  np.testing.assert_array_equal(predictions, want_predictions)
  assert_close(dh, want_dh, F32_GRAD, "d hidden")
  assert_close(dw, want_dw, F32_GRAD, "d head")


def test_tied_head_is_the_embedding_transposed(rng):
  """A tied model passes its `[vocab, d]` embedding table transposed: the gradient reaches the
  table through the transpose, as with the plain loss."""
  hidden, head, targets, weights = inputs(rng)
  table = head.T

  def grads(loss_fn):
    def loss(table):
      return jnp.sum(loss_fn(hidden, table.T, targets)[0] * weights)
    return jax.jit(jax.grad(loss))(table)

  assert_close(grads(chunked(8)), grads(cross_entropy), F32_GRAD, "d table")


def test_bfloat16_hidden(rng):
  """bfloat16 compute: float32 logits and losses, gradients in the hidden states' dtype."""
  args = inputs(rng, dtype=jnp.bfloat16)
  want_losses, _, (want_dh, want_dw) = loss_and_grads(cross_entropy, *args)
  losses, _, (dh, dw) = loss_and_grads(chunked(8), *args)
  assert losses.dtype == jnp.float32 and dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  assert_close(losses, want_losses, BF16, "losses")
  assert_close(dh, want_dh, BF16_GRAD, "d hidden")
  assert_close(dw, want_dw, BF16_GRAD, "d head")


def test_bad_chunk():
  hidden = jnp.zeros((1, 4, 2))
  for chunk in (0, -1, 2.0):
    with pytest.raises(ValueError, match="chunk must be a positive int"):
      chunked_cross_entropy(hidden, jnp.zeros((2, 3)), jnp.zeros((1, 4), jnp.int32), chunk)


def test_chunk_length():
  vocab = 256 * 1024
  per_token = vocab * 4  # bytes of one token's float32 logits
  assert chunk_length("off", 1, 1 << 20, vocab) == 0
  assert chunk_length(0, 1, 1 << 20, vocab) == 0
  assert chunk_length(100, 1, 8, vocab) == 100  # longer than the row: one chunk
  # "auto": plain while the whole logits fit the budget, else power-of-two chunks that fit it.
  fits = AUTO_LOGITS_BYTES // per_token
  assert chunk_length("auto", 1, fits, vocab) == 0
  assert chunk_length("auto", 1, fits + 1, vocab) == fits == 256
  assert chunk_length("auto", 3, 4096, vocab) == 64  # 85 rows of 3 fit: 64
  assert chunk_length("auto", 4096, 4096, vocab) == 1  # not even one token of every row fits


def temp_bytes(loss_fn, batch, seq, d, vocab):
  """XLA's temporary memory (deterministic on CPU) of the loss and its gradients w.r.t. hidden
  and head, compiled for abstract inputs (nothing runs)."""
  def loss(hidden, head, targets):
    return jnp.sum(loss_fn(hidden, head, targets)[0])
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  shapes = (jax.ShapeDtypeStruct((batch, seq, d), jnp.float32),
            jax.ShapeDtypeStruct((d, vocab), jnp.float32),
            jax.ShapeDtypeStruct((batch, seq), jnp.int32))
  return grad.lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def test_chunked_never_holds_the_logits():
  batch, seq, d, vocab = 2, 2048, 64, 8192
  logits_bytes = batch * seq * vocab * 4  # 128 MiB
  plain = temp_bytes(cross_entropy, batch, seq, d, vocab)
  chunk = temp_bytes(chunked(128), batch, seq, d, vocab)  # 8 MiB of logits per chunk
  assert plain > logits_bytes, (plain, logits_bytes)
  assert chunk < logits_bytes / 4, (chunk, logits_bytes)
