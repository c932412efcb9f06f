"""The LM's per-token loss: what training minimises and evaluation scores."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def token_losses(graphdef, params, batch) -> tuple[jax.Array, jax.Array]:
  """Per-token cross-entropy [batch, seq] float32 and the argmax predictions [batch, seq].

  `params` is the model's `nnx.to_pure_dict` form, merged with `graphdef` while tracing;
  `batch` holds "inputs", "targets", "segment_ids", "positions", each [batch, seq].
  """
  model = nnx.merge(graphdef, params)
  logits = model(batch["inputs"], batch["segment_ids"], batch["positions"]).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  return losses, jnp.argmax(logits, axis=-1)
