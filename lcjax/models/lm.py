"""The language model: embedding -> pattern of pre-norm residual blocks -> norm -> LM head."""

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.kernels.losses import logits
from lcjax.kernels.ops import LOCAL
from lcjax.models.config import ModelConfig
from lcjax.models.layers import Embed, RMSNorm, normal_param
from lcjax.models.pattern import MIXERS, parse_pattern
from lcjax.parallel.sequence import SequenceSharding


class Block(nnx.Module):
  """x + mixer(norm(x)): one block per pattern symbol, as in Megatron's hybrid models."""

  def __init__(self, cfg: ModelConfig, symbol: str, *, rngs: nnx.Rngs, ops=LOCAL):
    self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.mixer = MIXERS[symbol].module(cfg.mixer_config(symbol), cfg.wide, rngs=rngs, ops=ops)

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
    return x + self.mixer(self.norm(x), segment_ids=segment_ids, positions=positions)

  def prefill(self, x: jax.Array, cache, *, segment_ids: jax.Array, positions: jax.Array):
    y, cache = self.mixer.prefill(self.norm(x), cache, segment_ids=segment_ids,
                                  positions=positions)
    return x + y, cache

  def step(self, x: jax.Array, cache):
    y, cache = self.mixer.step(self.norm(x), cache)
    return x + y, cache


def _remat_policy(name: str):
  """None for "full" (save nothing, recompute the whole block), else the named policy."""
  return None if name == "full" else getattr(jax.checkpoint_policies, name)


class LM(nnx.Module):
  """`sequence`: a `lcjax.parallel.sequence.SequenceSharding` when each row is split over
  devices (the batch then comes in its layout's token order); None on one device. Either way it
  becomes the mixers' ops object (`lcjax.kernels.ops`: `LocalOps` for None); the loss reads it
  to chunk each device's own tokens (`lcjax.models.loss.head_losses`)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs,
               sequence: SequenceSharding | None = None):
    self.config = config
    embed_std = config.init_std if config.embed_init_std is None else config.embed_init_std
    self.embed = Embed(config.vocab_size, config.d_model, std=embed_std,
                       dtype=config.compute_dtype, rngs=rngs)
    self.sequence = sequence
    ops = LOCAL if sequence is None else sequence
    self.blocks = nnx.List([Block(config, s, rngs=rngs, ops=ops)
                            for s in parse_pattern(config.pattern)])
    self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps)
    if not config.tie_embeddings:
      self.lm_head = normal_param(rngs, (config.d_model, config.vocab_size), config.init_std,
                                  ("embed", "vocab"))

  def __call__(self, inputs: jax.Array, segment_ids: jax.Array,
               positions: jax.Array) -> jax.Array:
    """inputs, segment_ids, positions `[batch, seq]` int32 -> float32 `[batch, seq, vocab]`.

    Positions restart at 0 for every packed document; segment_ids keep documents apart.
    """
    return logits(self.hidden(inputs, segment_ids, positions), self.head_weights())

  def hidden(self, inputs: jax.Array, segment_ids: jax.Array,
             positions: jax.Array) -> jax.Array:
    """As `__call__`, up to the LM head: the final norm's output `[batch, seq, d_model]` in the
    compute dtype. The loss takes it with `head_weights()` so that it can avoid the full
    logits (`lcjax.models.loss`)."""
    def run_block(block, x, segment_ids, positions):
      return block(x, segment_ids=segment_ids, positions=positions)

    if self.config.remat != "none":
      run_block = nnx.remat(run_block, policy=_remat_policy(self.config.remat))

    x = self.embed(inputs)
    for block in self.blocks:
      x = run_block(block, x, segment_ids, positions)
    return self.final_norm(x)

  def head_weights(self) -> jax.Array:
    """The LM head `[d_model, vocab]` float32: the output matrix, or the embedding table
    transposed when they are tied (a transpose XLA folds into the matmul, not a copy)."""
    if self.config.tie_embeddings:
      return self.embed.embedding[...].T
    return self.lm_head[...]

  def _logits(self, x: jax.Array) -> jax.Array:
    """The last block's output `[batch, k, d_model]` -> float32 logits `[batch, k, vocab]`."""
    return logits(self.final_norm(x), self.head_weights())

  # --- decoding: one document per row, prompts left-padded to a common length ---

  def init_cache(self, batch: int, max_len: int) -> list:
    """Per block: a KV cache (attention, max_len slots), SSM + conv states (Mamba-2) or None
    (MLP). A pytree of arrays, so `decode_step` can be jitted with it."""
    return [block.mixer.init_cache(batch, max_len) for block in self.blocks]

  def prefill(self, tokens: jax.Array, cache: list,
              lengths: jax.Array | None = None) -> tuple[jax.Array, list]:
    """tokens `[batch, k]` and an empty cache from `init_cache(batch, max_len)` (max_len >= k
    plus the tokens to decode) -> (float32 logits `[batch, k, vocab]`, the filled cache).

    lengths `[batch]` int32: each row's prompt length, its tokens right-aligned in `tokens`
    after k - length pad tokens (None: every row is k long). Pads are a document of their own
    (segment 0; the prompt is segment 1) at position 0, which no mixer lets reach the prompt:
    the real positions' logits are the unpadded prompt's; the pads' are meaningless.
    """
    batch, seq = tokens.shape
    slots = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    pad = jnp.zeros((batch, 1), jnp.int32) if lengths is None else seq - lengths[:, None]
    segment_ids = (slots >= pad).astype(jnp.int32)
    positions = jnp.maximum(slots - pad, 0)
    x = self.embed(tokens)
    new_cache = []
    for block, c in zip(self.blocks, cache, strict=True):
      x, c = block.prefill(x, c, segment_ids=segment_ids, positions=positions)
      new_cache.append(c)
    return self._logits(x), new_cache

  def decode_step(self, token: jax.Array, cache: list) -> tuple[jax.Array, list]:
    """token `[batch]` int -> (float32 logits `[batch, vocab]` for the next token, cache)."""
    x = self.embed(token[:, None])[:, 0]
    new_cache = []
    for block, c in zip(self.blocks, cache, strict=True):
      x, c = block.step(x, c)
      new_cache.append(c)
    return self._logits(x[:, None])[:, 0], new_cache
