"""AdamW with linear warmup, cosine decay and global-norm clipping."""

import dataclasses

import gin
import jax
import optax
from flax import nnx

from lcjax.config import check_types


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimConfig:
  peak_learning_rate: float = 3e-3
  warmup_steps: int = 100
  final_learning_rate_fraction: float = 0.1  # cosine decays to peak * this at the last step
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  decay_embeddings: bool = False  # the input embedding table; the untied LM head always decays

  def __post_init__(self):
    check_types(self)  # a wrong-typed gin binding fails here, naming it


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=cfg.peak_learning_rate,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=cfg.peak_learning_rate * cfg.final_learning_rate_fraction,
  )


def decay_mask(abstract_params: nnx.State, cfg: OptimConfig):
  """True where weight decay applies: matrices, but not norms, biases (1-D) or embeddings.

  Decided from each parameter's logical axes, so new layers need no new rule: any 1-D
  parameter (norm scales, biases, Mamba's A_log / D / dt_bias) is exempt.
  """

  def one(var):
    axes = var.get_metadata()["logical_axes"]
    if len(axes) < 2:
      return False
    if tuple(axes) == ("vocab", "embed"):
      return cfg.decay_embeddings
    return True

  mask = jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(mask)


def make_optimizer(cfg: OptimConfig, learning_rate: optax.Schedule,
                   mask) -> optax.GradientTransformation:
  """AdamW following `learning_rate` (`lcjax.train.stages.learning_rate`: one schedule over
  the whole run, stages included)."""
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=mask),
  )
