"""The train step: a pure function of (state, batch), jitted once by the loop.

`state` is a plain pytree {"step", "params", "opt_state"} where `params` is the model's
`nnx.to_pure_dict` form; the module graph (`graphdef`) is merged back only while tracing.
"""

import jax
import jax.numpy as jnp
import optax

from lcjax.models.loss import token_losses


def _summed_loss(params, graphdef, batch):
  losses, _ = token_losses(graphdef, params, batch)
  weights = batch["loss_weights"].astype(jnp.float32)
  return jnp.sum(losses * weights), jnp.sum(weights)


def _microbatches(batch, n: int):
  """[batch, seq] -> [n, batch / n, seq], microbatch i = rows i, i+n, i+2n, ...

  Interleaving keeps every device's rows spread over all microbatches, so splitting a
  data-sharded batch needs no communication.
  """
  def split(x):
    b = x.shape[0]
    return x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def make_train_step(graphdef, optimizer: optax.GradientTransformation, schedule, accum_steps: int):
  """Returns step(state, batch) -> (state, metrics).

  The loss is the mean over every loss-weighted token of the global batch; with gradient
  accumulation the gradients of summed losses are added over microbatches and divided once,
  so accumulating is exactly the same objective as one big batch.
  """
  grad_fn = jax.value_and_grad(_summed_loss, has_aux=True)

  def step(state, batch):
    params = state["params"]
    if accum_steps == 1:
      (loss_sum, weight_sum), grads = grad_fn(params, graphdef, batch)
    else:
      def body(carry, micro):
        g_acc, l_acc, w_acc = carry
        (l, w), g = grad_fn(params, graphdef, micro)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, w_acc + w), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads, loss_sum, weight_sum), _ = jax.lax.scan(
          body, (zeros, 0.0, 0.0), _microbatches(batch, accum_steps))

    denom = jnp.maximum(weight_sum, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    metrics = {
        "loss": loss_sum / denom,
        "grad_norm": optax.global_norm(grads),
        # The loss sees the parameters before the update; this sees them after it, so an update
        # that overflows is caught at its own step, before it can be checkpointed.
        "param_norm": optax.global_norm(new_params),
        "lr": schedule(state["step"]),
        "loss_tokens": weight_sum,
    }
    return new_state, metrics

  return step
