"""The language model: embedding -> pattern of pre-norm residual blocks -> norm -> LM head."""

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.models.config import ModelConfig
from lcjax.models.layers import Embed, RMSNorm, normal_param
from lcjax.models.pattern import MIXERS, parse_pattern


class Block(nnx.Module):
  """x + mixer(norm(x)): one block per pattern symbol, as in Megatron's hybrid models."""

  def __init__(self, cfg: ModelConfig, symbol: str, *, rngs: nnx.Rngs):
    self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.mixer = MIXERS[symbol](cfg, rngs=rngs)

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
    return x + self.mixer(self.norm(x), segment_ids=segment_ids, positions=positions)


def _remat_policy(name: str):
  """None for "full" (save nothing, recompute the whole block), else the named policy."""
  return None if name == "full" else getattr(jax.checkpoint_policies, name)


class LM(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = Embed(config.vocab_size, config.d_model, std=config.init_std,
                       dtype=config.compute_dtype, rngs=rngs)
    self.blocks = nnx.List([Block(config, s, rngs=rngs) for s in parse_pattern(config.pattern)])
    self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps)
    if not config.tie_embeddings:
      self.lm_head = normal_param(rngs, (config.d_model, config.vocab_size), config.init_std,
                                  ("embed", "vocab"))

  def __call__(self, inputs: jax.Array, segment_ids: jax.Array,
               positions: jax.Array) -> jax.Array:
    """inputs, segment_ids, positions `[batch, seq]` int32 -> float32 `[batch, seq, vocab]`.

    Positions restart at 0 for every packed document; segment_ids keep documents apart.
    """
    def run_block(block, x, segment_ids, positions):
      return block(x, segment_ids=segment_ids, positions=positions)

    if self.config.remat != "none":
      run_block = nnx.remat(run_block, policy=_remat_policy(self.config.remat))

    x = self.embed(inputs)
    for block in self.blocks:
      x = run_block(block, x, segment_ids, positions)
    x = self.final_norm(x)
    if self.config.tie_embeddings:
      return self.embed.attend(x)
    return jnp.einsum("bsd,dv->bsv", x, self.lm_head[...].astype(x.dtype),
                      preferred_element_type=jnp.float32)
