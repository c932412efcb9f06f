"""The model's hyperparameters, validated once, at construction."""

import dataclasses
import inspect
import math

import gin
import jax
import jax.numpy as jnp

from lcjax.config import check_types

DTYPES = ("auto", "float32", "bfloat16", "float16")
POSITION_ENCODINGS = ("rope", "none")


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

  pattern: one symbol per block, Megatron's hybrid notation ("*" attention, "-" MLP; see
    `lcjax.models.pattern.MIXERS`).
  position_encoding: "rope", or "none" for attention without positions (the causal mask and
    the Mamba layers carry order, as in NVIDIA's Mamba-2-Hybrid).
  dtype: the compute dtype; parameters are always stored in float32. "auto" is bfloat16 on
    GPU and TPU and float32 on CPU (where bfloat16 matmuls are emulated and slow).
  remat: "none", "full" (save nothing), or a policy name in `jax.checkpoint_policies`.
  """
  vocab_size: int = 384
  d_model: int = 128
  pattern: str = "*-*-*-*-"
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 384
  position_encoding: str = "rope"
  rope_theta: float = 10000.0
  tie_embeddings: bool = True
  norm_eps: float = 1e-6
  dtype: str = "auto"
  remat: str = "none"
  init_std: float = 0.02

  def __post_init__(self):
    # Imported here: pattern.py imports the layer modules, which import this one.
    from lcjax.models.pattern import parse_pattern
    check_types(self)
    parse_pattern(self.pattern)
    for name in ("vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}: "
          f"change one of them (e.g. num_kv_heads to a divisor of {self.num_heads}).")
    if self.position_encoding not in POSITION_ENCODINGS:
      raise ValueError(f"position_encoding={self.position_encoding!r} is not one of "
                       f"{POSITION_ENCODINGS}.")
    if self.position_encoding == "rope" and self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE (it rotates pairs of "
                       f"features): use an even head_dim or position_encoding='none'.")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype={self.dtype!r} is not one of {DTYPES}.")
    remats = ("none", "full") + checkpoint_policy_names()
    if self.remat not in remats:
      raise ValueError(f"remat={self.remat!r} is not one of {remats}.")

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


def num_params(cfg: ModelConfig) -> int:
  """Parameter count, by hand from the architecture (tests check it against the model)."""
  from lcjax.models.pattern import parse_pattern

  d, hd = cfg.d_model, cfg.head_dim
  mixer = {
      "*": d * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * d,  # q,k,v,o
      "-": 3 * d * cfg.mlp_dim,  # gate, up, down
  }
  blocks = sum(d + mixer[s] for s in parse_pattern(cfg.pattern))  # + the pre-norm scale
  head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
  return cfg.vocab_size * d + blocks + d + head  # embedding, blocks, final norm, head
