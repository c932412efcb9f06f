"""The model's hyperparameters, validated once, at construction."""

import dataclasses
import inspect
import math

import gin
import jax
import jax.numpy as jnp

from lcjax.config import check_types
from lcjax.kernels import attention as attention_kernels
from lcjax.kernels import ssd as ssd_kernels

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

  pattern: one symbol per block, Megatron's hybrid notation ("*" attention, "-" MLP,
    "M" Mamba-2; see `lcjax.models.pattern.MIXERS`).
  position_encoding: "rope", or "none" for attention without positions (the causal mask and
    the Mamba layers carry order, as in NVIDIA's Mamba-2-Hybrid).
  dtype: the compute dtype; parameters are always stored in float32. "auto" is bfloat16 on
    GPU and TPU and float32 on CPU (where bfloat16 matmuls are emulated and slow).
  remat: "none", "full" (save nothing), or a policy name in `jax.checkpoint_policies`.
  attention_window: None for full causal attention, else a sliding window of that many tokens
    (the token itself included); attention_sinks: with a window, the first tokens of every
    document that stay visible to all later ones (StreamingLLM's attention sinks).
  attention_impl / ssd_impl: the kernel, by name (`lcjax.kernels.attention.IMPLS`,
    `lcjax.kernels.ssd.IMPLS`); "auto" picks the fastest one the backend has.
  attention_block_q / attention_block_kv: the tiles of the tiled attention kernels ("blockwise",
    "pallas", and each device's share of ring attention); Triton wants powers of two >= 16,
    Mosaic multiples of 128.

  mamba_*: the Mamba-2 mixer ("M"), named and defaulted as mamba_ssm's `Mamba2`: d_inner =
    mamba_expand * d_model channels in mamba_headdim-wide heads (mamba_nheads of them) sharing
    mamba_ngroups groups of B/C of width mamba_d_state; a depthwise causal conv of width
    mamba_d_conv; the SSD scan in chunks of mamba_chunk_size. dt is initialised log-uniform in
    [mamba_dt_min, mamba_dt_max] (floored at mamba_dt_init_floor) and clamped to
    mamba_dt_limit after the softplus; A = -a with a ~ U(mamba_A_init_range).
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
  attention_window: int | None = None
  attention_sinks: int = 0
  attention_impl: str = "auto"
  ssd_impl: str = "auto"
  attention_block_q: int = 128
  attention_block_kv: int = 128
  mamba_d_state: int = 128
  mamba_d_conv: int = 4
  mamba_expand: int = 2
  mamba_headdim: int = 64
  mamba_ngroups: int = 1
  mamba_chunk_size: int = 256
  mamba_dt_min: float = 0.001
  mamba_dt_max: float = 0.1
  mamba_dt_init_floor: float = 1e-4
  mamba_dt_limit: tuple[float, float] = (0.0, float("inf"))
  mamba_A_init_range: tuple[float, float] = (1.0, 16.0)

  def __post_init__(self):
    # Imported here: pattern.py imports the layer modules, which import this one.
    from lcjax.models.pattern import parse_pattern
    check_types(self)
    parse_pattern(self.pattern)
    for name in ("vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                 "attention_block_q", "attention_block_kv"):
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
    if self.attention_window is not None and self.attention_window < 1:
      raise ValueError(f"attention_window={self.attention_window} must be >= 1 (tokens, the "
                       f"query included), or None for full causal attention.")
    if self.attention_sinks < 0 or (self.attention_sinks and self.attention_window is None):
      raise ValueError(f"attention_sinks={self.attention_sinks} needs >= 0 and a sliding "
                       f"window (without one every token is visible anyway): set "
                       f"ModelConfig.attention_window or attention_sinks = 0.")
    self._check_kernels()
    self._check_mamba()

  def _check_kernels(self):
    for name, impls in (("attention_impl", attention_kernels.IMPLS),
                        ("ssd_impl", ssd_kernels.IMPLS)):
      value = getattr(self, name)
      if value != "auto" and value not in impls:
        raise ValueError(f"ModelConfig.{name}={value!r} is not one of "
                         f"{('auto',) + tuple(sorted(impls))}.")

  def _check_mamba(self):
    for name in ("mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_headdim",
                 "mamba_ngroups", "mamba_chunk_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}.")
    if not 0 < self.mamba_dt_min <= self.mamba_dt_max:
      raise ValueError(
          f"Need 0 < mamba_dt_min <= mamba_dt_max, got mamba_dt_min={self.mamba_dt_min}, "
          f"mamba_dt_max={self.mamba_dt_max}: fix ModelConfig.mamba_dt_min/mamba_dt_max.")
    if self.mamba_dt_init_floor < 0:
      raise ValueError(f"ModelConfig.mamba_dt_init_floor must be >= 0, got "
                       f"{self.mamba_dt_init_floor}.")
    lo, hi = self.mamba_dt_limit
    if not 0 <= lo < hi:
      raise ValueError(f"ModelConfig.mamba_dt_limit={self.mamba_dt_limit} must be (min, max) "
                       f"with 0 <= min < max, e.g. (0.0, float('inf')) for no clamp.")
    lo, hi = self.mamba_A_init_range
    if not 0 < lo <= hi:
      raise ValueError(f"ModelConfig.mamba_A_init_range={self.mamba_A_init_range} must be "
                       f"(min, max) with 0 < min <= max (A = -U(min, max)), e.g. (1.0, 16.0).")
    if "M" not in self.pattern:
      return  # The divisibility constraints only bind models that have Mamba-2 layers.
    if self.mamba_d_inner % self.mamba_headdim:
      raise ValueError(
          f"mamba_expand * d_model = {self.mamba_d_inner} must be a multiple of "
          f"mamba_headdim={self.mamba_headdim}: change ModelConfig.mamba_headdim (or "
          f"mamba_expand / d_model).")
    if self.mamba_nheads % self.mamba_ngroups:
      raise ValueError(
          f"The {self.mamba_nheads} Mamba-2 heads (mamba_expand * d_model / mamba_headdim) "
          f"must be a multiple of mamba_ngroups={self.mamba_ngroups}: change "
          f"ModelConfig.mamba_ngroups to a divisor of {self.mamba_nheads}.")

  @property
  def num_layers(self) -> int:
    """Blocks in the model: one per pattern symbol, as Megatron counts hybrid layers."""
    return len(self.pattern)

  @property
  def mamba_d_inner(self) -> int:
    return self.mamba_expand * self.d_model

  @property
  def mamba_nheads(self) -> int:
    return self.mamba_d_inner // self.mamba_headdim

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
      "M": _mamba_params(cfg),
  }
  blocks = sum(d + mixer[s] for s in parse_pattern(cfg.pattern))  # + the pre-norm scale
  head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
  return cfg.vocab_size * d + blocks + d + head  # embedding, blocks, final norm, head


def _mamba_params(cfg: ModelConfig) -> int:
  d, inner, heads = cfg.d_model, cfg.mamba_d_inner, cfg.mamba_nheads
  bc = 2 * cfg.mamba_ngroups * cfg.mamba_d_state  # B and C
  in_proj = d * (2 * inner + bc + heads)  # z, x, B, C, dt
  conv = (cfg.mamba_d_conv + 1) * (inner + bc)  # depthwise weights + biases over x, B, C
  return in_proj + conv + 3 * heads + inner + inner * d  # A_log, dt_bias, D; norm; out_proj
