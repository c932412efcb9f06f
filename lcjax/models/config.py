"""The model's hyperparameters, validated once, at construction.

`ModelConfig` holds the model-wide fields and one sub-config per mixer kind (`AttentionConfig`,
`MambaConfig`, `MLPConfig`, each gin-configurable on its own: `AttentionConfig.num_heads = 8`).
"""

import dataclasses
import inspect
import math

import gin
import jax
import jax.numpy as jnp

from lcjax.config import check_positive, check_types
from lcjax.errors import ConfigError
from lcjax.models.attention import AttentionConfig
from lcjax.models.layers import ModelWide
from lcjax.models.mamba import MambaConfig
from lcjax.models.mlp import MLPConfig
from lcjax.models.pattern import MIXERS, parse_pattern

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOSS_CHUNK_NAMES = ("auto", "off")


def checkpoint_policy_names() -> tuple[str, ...]:
  """Names in `jax.checkpoint_policies` that are policies themselves.

  Factories such as `save_only_these_names` need arguments a string cannot carry; policies are
  called as `policy(prim, *avals, **params)`, so they are the ones taking **kwargs.
  """
  def is_policy(fn):
    params = inspect.signature(fn).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)

  return tuple(name for name in dir(jax.checkpoint_policies)
               if not name.startswith("_") and is_policy(getattr(jax.checkpoint_policies, name)))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Defaults are a tiny model that trains on CPU.

  pattern: one symbol per block, Megatron's hybrid notation ("*" attention, "-" MLP,
    "M" Mamba-2; see `lcjax.models.pattern.MIXERS`).
  dtype: the compute dtype; parameters are always stored in float32. "auto" is bfloat16 on
    GPU and TPU and float32 on CPU (where bfloat16 matmuls are emulated and slow).
  remat: "none", "full" (save nothing), or a policy name in `jax.checkpoint_policies`.
  loss_chunk: how the training and eval loss computes the LM head's logits
    (`lcjax.models.loss`): "auto" cuts the sequence into chunks only when the whole float32
    logits would be large, an int n > 0 always cuts it into chunks of n tokens (any length: a
    shorter last chunk is fine), 0 or "off" never does. Chunking changes memory, not results.
  attention / mamba / mlp: the mixers' own configs (by default from their gin bindings).
  """
  vocab_size: int = 384
  d_model: int = 128
  pattern: str = "*-*-*-*-"
  tie_embeddings: bool = True
  norm_eps: float = 1e-6
  dtype: str = "auto"
  remat: str = "none"
  init_std: float = 0.02
  embed_init_std: float | None = None  # None: init_std
  loss_chunk: int | str = "auto"
  attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
  mamba: MambaConfig = dataclasses.field(default_factory=MambaConfig)
  mlp: MLPConfig = dataclasses.field(default_factory=MLPConfig)

  def __post_init__(self):
    check_types(self)
    symbols = parse_pattern(self.pattern)
    check_positive(self, ("vocab_size", "d_model"))
    if self.dtype not in DTYPES:
      raise ConfigError(f"ModelConfig.dtype={self.dtype!r} is not one of {DTYPES}.")
    remats = ("none", "full") + checkpoint_policy_names()
    if self.remat not in remats:
      raise ConfigError(f"ModelConfig.remat={self.remat!r} is not one of {remats}.")
    if self.loss_chunk not in LOSS_CHUNK_NAMES and not (
        isinstance(self.loss_chunk, int) and self.loss_chunk >= 0):
      raise ConfigError(f"ModelConfig.loss_chunk={self.loss_chunk!r} is not one of "
                        f"{LOSS_CHUNK_NAMES} or a chunk length in tokens >= 0 (0: no chunks).")
    for symbol in sorted(set(symbols)):  # constraints bind only the mixers the model has
      mixer = MIXERS[symbol]
      if mixer.check_d_model is not None:
        mixer.check_d_model(self.mixer_config(symbol), self.d_model)

  def mixer_config(self, symbol: str):
    """The sub-config the mixer of a pattern symbol reads."""
    return getattr(self, MIXERS[symbol].name)

  def for_inference(self) -> "ModelConfig":
    """This config with training-only attention off (S²-Attn: full attention instead). The
    parameters are the same: evaluate a model trained with S² through this config's graphdef."""
    return dataclasses.replace(self, attention=dataclasses.replace(self.attention, s2_groups=0))

  @property
  def num_layers(self) -> int:
    """Blocks in the model: one per pattern symbol, as Megatron counts hybrid layers."""
    return len(self.pattern)

  @property
  def compute_dtype(self) -> jnp.dtype:
    if self.dtype == "auto":
      return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32)
    return jnp.dtype(self.dtype)

  @property
  def output_init_std(self) -> float:
    """Init std of projections that write into the residual stream.

    GPT-2's 1/sqrt(2 * n_layers) with n_layers = num_layers (Megatron's convention for
    hybrids), keeping the residual stream's variance roughly depth-independent at init.
    """
    return self.init_std / math.sqrt(2 * self.num_layers)

  @property
  def wide(self) -> ModelWide:
    """What every mixer is built with besides its own config."""
    return ModelWide(d_model=self.d_model, dtype=self.compute_dtype, init_std=self.init_std,
                     output_init_std=self.output_init_std, norm_eps=self.norm_eps)
