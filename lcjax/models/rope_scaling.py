"""RoPE context-extension scalings: the `rope_scaling` dict, checked, and its inverse
frequencies and attention factor, with the semantics of Hugging Face transformers'
`modeling_rope_utils` (`ROPE_INIT_FUNCTIONS` and `dynamic_rope_update`).

The dict uses transformers' keys, so an HF config.json's `rope_scaling` maps onto it, with two
differences: rope_theta and partial_rotary_factor are `AttentionConfig` fields (never keys), and
"dynamic" names its pretraining length `original_max_position_embeddings` (transformers reads
`config.max_position_embeddings` there; an importer copies it in).

  default   no key.
  linear    factor: position interpolation (PI), every frequency divided by factor.
  dynamic   factor, original_max_position_embeddings: NTK-aware base growth with the current
            length L: base * (factor * L / orig - (factor - 1)) ** (d / (d - 2)), L >= orig.
  yarn      factor, original_max_position_embeddings; attention_factor, beta_fast (32),
            beta_slow (1), mscale, mscale_all_dim, truncate (True): PI on the slow pairs, none on
            the fast ones, a linear ramp between; attention_factor 0.1 ln(factor) + 1 unless given.
  llama3    factor, original_max_position_embeddings, low_freq_factor, high_freq_factor.
  longrope  short_factor, long_factor (rotary_dim // 2 numbers each),
            original_max_position_embeddings; factor, attention_factor: the long factors once
            the length exceeds original_max_position_embeddings, else the short ones.

Every function here takes d = rotary_dim (head_dim * partial_rotary_factor) and returns numpy
float64 inv_freq `[d // 2]`, or float32 jax when the length is traced (decoding).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.errors import ConfigError

_ORIG = "original_max_position_embeddings"
# rope_type -> (required keys, optional keys), besides rope_type itself.
ROPE_TYPES = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor", _ORIG), ()),
    "yarn": (("factor", _ORIG), ("attention_factor", "beta_fast", "beta_slow", "mscale",
                                 "mscale_all_dim", "truncate")),
    "llama3": (("factor", _ORIG, "low_freq_factor", "high_freq_factor"), ()),
    "longrope": (("short_factor", "long_factor", _ORIG), ("factor", "attention_factor")),
}
_NAME = "AttentionConfig.rope_scaling"


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _value_error(key: str, value, rotary_dim: int) -> str | None:
  """What `value` of `key` must be, or None when it is fine."""
  if key in ("short_factor", "long_factor"):
    ok = (isinstance(value, (list, tuple)) and len(value) == rotary_dim // 2
          and all(_is_number(v) and v > 0 for v in value))
    return None if ok else f"{rotary_dim // 2} positive numbers (rotary_dim // 2)"
  if key == "truncate":
    return None if isinstance(value, bool) else "True or False"
  if key == _ORIG:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    return None if ok else "an int > 0"
  return None if _is_number(value) and value > 0 else "a number > 0"


def check_scaling(scaling: dict, rotary_dim: int) -> None:
  """Raises ConfigError naming the first wrong key or value of `scaling` and what is allowed."""
  rope_type = scaling.get("rope_type")
  if rope_type not in ROPE_TYPES:
    raise ConfigError(f"{_NAME}['rope_type'] = {rope_type!r}: must be one of "
                      f"{sorted(ROPE_TYPES)} (transformers' names).")
  required, optional = ROPE_TYPES[rope_type]
  allowed = ("rope_type", *required, *optional)
  extra = sorted(set(scaling) - set(allowed))
  missing = [k for k in required if k not in scaling]
  if extra:
    fields = {"rope_theta": "AttentionConfig.rope_theta",
              "partial_rotary_factor": "AttentionConfig.partial_rotary_factor"}
    hint = f" (set {fields[extra[0]]} instead)" if extra[0] in fields else ""
    raise ConfigError(f"{_NAME} has key {extra[0]!r}, unknown for rope_type {rope_type!r}"
                      f"{hint}: the allowed keys are {list(allowed)}.")
  if missing:
    raise ConfigError(f"{_NAME} with rope_type {rope_type!r} misses {missing}: it needs "
                      f"{list(required)} and may have {list(optional)}.")
  for key in allowed[1:]:
    want = _value_error(key, scaling[key], rotary_dim) if key in scaling else None
    if want:
      raise ConfigError(f"{_NAME}[{key!r}] = {scaling[key]!r}: must be {want}.")
  if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
    raise ConfigError(f"{_NAME}: high_freq_factor={scaling['high_freq_factor']} must exceed "
                      f"low_freq_factor={scaling['low_freq_factor']}.")
  if rope_type == "dynamic" and rotary_dim < 4:
    raise ConfigError(f"{_NAME}: dynamic NTK needs a rotary dim >= 4 (its exponent is "
                      f"d / (d - 2)), got {rotary_dim}.")
  if rope_type == "longrope" and "factor" not in scaling and "attention_factor" not in scaling:
    raise ConfigError(f"{_NAME}: longrope needs 'factor' (transformers' default: "
                      f"max_position_embeddings / original_max_position_embeddings) or "
                      f"'attention_factor'.")


def _exponents(dim: int) -> np.ndarray:
  """`[dim // 2]` float64: 2i / dim, so that theta ** -exponent is pair i's rotation speed."""
  return np.arange(0, dim, 2, dtype=np.float64) / dim


def _traced(length) -> bool:
  return isinstance(length, jax.Array)


def _dynamic(dim, theta, s, length):
  """NTK-aware: the base grows with the current length (never below the original one)."""
  orig, factor = s[_ORIG], s["factor"]
  length = orig if length is None else length
  traced = _traced(length)
  length = jnp.maximum(length, orig).astype(jnp.float32) if traced else max(length, orig)
  base = theta * (factor * length / orig - (factor - 1)) ** (dim / (dim - 2))
  inv_freq = base ** -_exponents(dim)
  if traced:
    # float32 when traced; up to the original length exactly the original inv_freq (as
    # transformers, which resets to its stored copy there).
    inv_freq = jnp.where(length > orig, inv_freq, theta ** -_exponents(dim))
  return inv_freq, 1.0


def _yarn_attention_factor(s) -> float:
  if s.get("attention_factor") is not None:
    return float(s["attention_factor"])

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  factor = s["factor"]
  if s.get("mscale") and s.get("mscale_all_dim"):
    return mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
  return mscale(factor)


def _yarn(dim, theta, s, length):
  """Pairs that turn fewer than beta_slow times over the original length are interpolated (PI),
  those that turn more than beta_fast times are kept, with a linear ramp between."""
  del length
  orig, factor = s[_ORIG], s["factor"]
  beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

  def pair_of(turns):  # the (fractional) pair index that turns `turns` times over orig
    return dim * math.log(orig / (turns * 2 * math.pi)) / (2 * math.log(theta))

  low, high = pair_of(beta_fast), pair_of(beta_slow)
  if s.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # a step, not a division by zero
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  inv_freq = theta ** -_exponents(dim)
  return inv_freq / factor * ramp + inv_freq * (1 - ramp), _yarn_attention_factor(s)


def _llama3(dim, theta, s, length):
  """Wavelengths above orig / low_freq_factor are divided by factor, those below
  orig / high_freq_factor kept, and the band between blended smoothly."""
  del length
  orig, factor = s[_ORIG], s["factor"]
  low, high = s["low_freq_factor"], s["high_freq_factor"]
  inv_freq = theta ** -_exponents(dim)
  wavelen = 2 * math.pi / inv_freq
  smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
  return inv_freq / factor * (1 - smooth) + inv_freq * smooth, 1.0


def _longrope(dim, theta, s, length):
  """Per-pair factors: long ones once the length exceeds the original, short ones below."""
  orig = s[_ORIG]
  factor = s.get("factor")
  attention_factor = s.get("attention_factor")
  if attention_factor is None:
    attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
  inv_freq = theta ** -_exponents(dim)
  short, long = np.asarray(s["short_factor"], np.float64), np.asarray(s["long_factor"], np.float64)
  if _traced(length):
    return jnp.where(length > orig, inv_freq / long, inv_freq / short), float(attention_factor)
  use_long = length is not None and length > orig
  return inv_freq / (long if use_long else short), float(attention_factor)


INV_FREQ = {
    "default": lambda dim, theta, s, length: (theta ** -_exponents(dim), 1.0),
    "linear": lambda dim, theta, s, length: (theta ** -_exponents(dim) / s["factor"], 1.0),
    "dynamic": _dynamic,
    "yarn": _yarn,
    "llama3": _llama3,
    "longrope": _longrope,
}
