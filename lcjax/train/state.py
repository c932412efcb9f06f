"""The train state {"step", "params", "opt_state"}: its abstract shape, shardings and init.

Nothing here materialises an unsharded array: shapes come from `nnx.eval_shape`, and params
and optimizer state are created inside `jax.jit` directly with their target shardings.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lcjax.models.config import ModelConfig
from lcjax.models.lm import LM
from lcjax.parallel import sharding
from lcjax.parallel.sequence import SequenceSharding


def model_skeleton(cfg: ModelConfig, sequence: SequenceSharding | None = None):
  """(graphdef, abstract params State with logical_axes metadata), without allocating.

  `sequence` (rows split over devices) lives in the graphdef: it changes how the forward runs,
  not the parameters."""
  abstract = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0), sequence=sequence))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"LM holds non-parameter state the train step would drop: {rest}")
  return graphdef, params


def abstract_state(abstract_params: nnx.State, optimizer: optax.GradientTransformation):
  params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                        nnx.to_pure_dict(abstract_params))
  return {
      "step": jax.ShapeDtypeStruct((), jnp.int32),
      "params": params,
      "opt_state": jax.eval_shape(optimizer.init, params),
  }


def state_shardings(abstract_params: nnx.State, optimizer, mesh, rules):
  """Shardings for the whole state: optimizer moments follow their parameters."""
  param_sh = sharding.param_shardings(abstract_params, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_abstract = abstract_state(abstract_params, optimizer)["opt_state"]
  opt_sh = optax.tree_map_params(
      optimizer, lambda _, s: s, opt_abstract, param_sh,
      transform_non_params=lambda _: replicated)
  return {"step": replicated, "params": param_sh, "opt_state": opt_sh}


def init_state(cfg: ModelConfig, seed: int, optimizer, shardings):
  """Fresh parameters and optimizer state, created already sharded."""

  def init():
    model = LM(cfg, rngs=nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": optimizer.init(params)}

  return jax.jit(init, out_shardings=shardings)()


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying target shardings, for restoring straight onto the mesh."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
