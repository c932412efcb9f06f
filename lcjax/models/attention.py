"""Grouped-query self-attention over packed documents, with optional RoPE and a KV cache: the
"*" mixer, its config and its FLOPs."""

import dataclasses
import functools
from typing import NamedTuple

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.config import check_positive, check_types
from lcjax.errors import ConfigError
from lcjax.kernels import attention as attention_kernels
from lcjax.kernels.mask import Mask
from lcjax.kernels.ops import LOCAL
from lcjax.models.layers import ModelWide, normal_param
from lcjax.models.rope import ANGLE_DTYPES, apply_rope, check_rope

POSITION_ENCODINGS = ("rope", "none")
BIASES = ("none", "qkv", "qkvo")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """The attention mixer ("*").

  num_heads query heads share num_kv_heads key/value heads (grouped-query), each head_dim wide.
  position_encoding: "rope", or "none" for attention without positions (the causal mask and
    the Mamba layers carry order, as in NVIDIA's Mamba-2-Hybrid); rope_theta: RoPE's base.
  rope_scaling: None, or a context-extension scaling with transformers' keys, e.g.
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    (`lcjax.models.rope_scaling`: linear, dynamic, yarn, llama3, longrope). Dynamic NTK and
    LongRoPE read the current length: the row length in `__call__`, the prompt length in
    `prefill`, the tokens seen so far in `step`.
  partial_rotary_factor: the fraction of head_dim that rotates (GPT-NeoX, Phi); the rest passes
    through. rope_dtype: "float32", or "bfloat16" to compute the angles in bfloat16 (the
    precision loss AnchorAttention studies; for experiments only).
  max_distance: LM-Infinite's distance limit (decoding only: `prefill` and `step`): with a
    window and sinks, a sink outside the window is seen by RoPE at distance
    min(distance, max_distance) (LM-Infinite: the pre-training length). `__call__` ignores it.
  window: None for full causal attention, else a sliding window of that many tokens (the token
    itself included); sinks: with a window, the first tokens of every document that stay
    visible to all later ones (StreamingLLM's attention sinks).
  anchor: AnchorAttention: every document of a packed row also sees the row's first token (the
    data must insert one: `DataConfig.anchor`; `lcjax.data.pipeline.check_anchor`).
  s2_groups: LongLoRA's S²-Attn for training, 0 for off: attention within `s2_groups` groups of
    seq / s2_groups tokens, the groups of half of the heads shifted by half a group so that
    information crosses groups. Prefill and decoding always attend fully; evaluate with
    `ModelConfig.for_inference()`.
  bias: which projections add a bias: "none" (Llama, Mistral), "qkv" (Qwen2) or "qkvo"
    (Llama's attention_bias=True).
  impl: the kernel, by name (`lcjax.kernels.attention.IMPLS`); "auto" picks the fastest one
    the backend has.
  block_q / block_kv: the tiles of the tiled kernels ("blockwise", "pallas", and each device's
    share of ring attention); Triton wants powers of two >= 16, Mosaic multiples of 128.
  """
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  position_encoding: str = "rope"
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None
  partial_rotary_factor: float = 1.0
  rope_dtype: str = "float32"
  max_distance: int | None = None
  window: int | None = None
  sinks: int = 0
  anchor: bool = False
  s2_groups: int = 0
  bias: str = "none"
  impl: str = "auto"
  block_q: int = 128
  block_kv: int = 128

  def __post_init__(self):
    check_types(self)
    check_positive(self, ("num_heads", "num_kv_heads", "head_dim", "block_q", "block_kv"))
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"AttentionConfig.num_heads={self.num_heads} must be a multiple of "
          f"AttentionConfig.num_kv_heads={self.num_kv_heads}: change one of them (e.g. "
          f"num_kv_heads to a divisor of {self.num_heads}).")
    if self.position_encoding not in POSITION_ENCODINGS:
      raise ConfigError(f"AttentionConfig.position_encoding={self.position_encoding!r} is not "
                        f"one of {POSITION_ENCODINGS}.")
    self._check_rope()
    if self.bias not in BIASES:
      raise ConfigError(f"AttentionConfig.bias={self.bias!r} is not one of {BIASES}.")
    if self.window is not None and self.window < 1:
      raise ConfigError(f"AttentionConfig.window={self.window} must be >= 1 (tokens, the query "
                        f"included), or None for full causal attention.")
    if self.sinks < 0 or (self.sinks and self.window is None):
      raise ConfigError(f"AttentionConfig.sinks={self.sinks} needs >= 0 and a sliding window "
                        f"(without one every token is visible anyway): set "
                        f"AttentionConfig.window or AttentionConfig.sinks = 0.")
    if self.s2_groups and (self.s2_groups < 2 or self.num_heads % 2):
      raise ConfigError(
          f"AttentionConfig.s2_groups={self.s2_groups} needs >= 2 groups (LongLoRA: 4) and an "
          f"even num_heads={self.num_heads} (half of the heads shift): fix one of them, or set "
          f"s2_groups = 0 for full attention.")
    attention_kernels.ATTENTION.check_name(self.impl, "AttentionConfig.impl")

  def __hash__(self):
    # Hashable like the other configs (graphdefs hold them) though rope_scaling is a dict.
    freeze = lambda v: (tuple(sorted((k, freeze(x)) for k, x in v.items())) if isinstance(v, dict)
                        else tuple(v) if isinstance(v, list) else v)
    return hash(tuple(freeze(getattr(self, f.name)) for f in dataclasses.fields(self)))

  def _check_rope(self):
    if self.position_encoding == "rope":
      check_rope(self.head_dim, self.rope_scaling, self.partial_rotary_factor)
    else:
      for name, default in (("rope_scaling", None), ("partial_rotary_factor", 1.0),
                            ("max_distance", None)):
        if getattr(self, name) != default:
          raise ConfigError(f"AttentionConfig.{name}={getattr(self, name)!r} needs "
                            f"position_encoding='rope' (it is {self.position_encoding!r}).")
    if self.rope_dtype not in ANGLE_DTYPES:
      raise ConfigError(f"AttentionConfig.rope_dtype={self.rope_dtype!r} is not one of "
                        f"{ANGLE_DTYPES}.")
    if self.max_distance is not None and (self.max_distance < 1 or self.window is None
                                          or not self.sinks):
      raise ConfigError(
          f"AttentionConfig.max_distance={self.max_distance} (LM-Infinite) caps the distance to "
          f"the sinks beyond the sliding window: it must be >= 1 and needs "
          f"AttentionConfig.window and AttentionConfig.sinks > 0 (window={self.window}, "
          f"sinks={self.sinks}).")

  @property
  def mask(self) -> Mask:
    """The mask of full attention (prefill, decoding, and training without S²)."""
    return Mask(window=self.window, sinks=self.sinks, anchor=self.anchor)


def attention_flops(cfg: AttentionConfig, d_model: int, seq_len: int) -> float:
  """Forward matmul FLOPs per token: the q, k, v, o projections, and scores and values at
  their causal cost (query i attends to i+1 keys: (seq+1)/2 on average over a full row)."""
  q_and_o = 2 * d_model * cfg.num_heads * cfg.head_dim
  k_and_v = 2 * d_model * cfg.num_kv_heads * cfg.head_dim
  mean_keys = (seq_len + 1) / 2
  scores_and_values = 2 * 2 * cfg.num_heads * cfg.head_dim * mean_keys
  return 2 * (q_and_o + k_and_v) + scores_and_values


class KVCache(NamedTuple):
  """Keys and values (after RoPE) `[batch, max_len, kv_heads, head_dim]` in the compute dtype;
  index: int32 scalar, the number of filled slots (the next token's slot); start: int32
  `[batch]`, each row's first real slot (a prompt shorter than the prefill is left-padded), so
  slot s holds position s - start."""
  k: jax.Array
  v: jax.Array
  index: jax.Array
  start: jax.Array


def _check_room(index: jax.Array, max_len: int) -> None:
  """Fails if decoding would write position `index` into a cache of max_len slots: at once
  when index is concrete, else when the compiled step runs (a callback only on that branch)."""
  def fail(index):
    raise ValueError(
        f"Attention.step at position {int(index)}: the KV cache holds max_len={max_len} "
        f"positions. Pass a larger max_len to init_cache (the prompt plus every token to "
        f"decode).")

  if not isinstance(index, jax.core.Tracer):
    if int(index) >= max_len:
      fail(index)
    return
  jax.lax.cond(index >= max_len, lambda: jax.debug.callback(fail, index), lambda: None)


def s2_attention(attend, q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask,
                 groups: int) -> jax.Array:
  """LongLoRA's S²-Attn: the first half of the heads attend within `groups` groups of
  G = seq / groups tokens, the second half within groups shifted by G / 2.

  q `[batch, seq, heads, head_dim]`, k, v `[batch, seq, kv_heads, head_dim]` -> like q;
  attend(q, k, v, mask=...) is the attention op. Each half is one kernel call with the group
  rule in its mask (the kernels take one mask for all heads). Unlike LongLoRA's roll of the
  shifted heads, nothing wraps around: the first G / 2 tokens form a group of their own.
  """
  seq, heads, kv_heads = q.shape[1], q.shape[2], k.shape[2]
  if seq % groups:
    raise ValueError(f"AttentionConfig.s2_groups={groups} must divide the sequence length "
                     f"{seq}: change one of them.")
  size = seq // groups
  if kv_heads % 2:  # a kv head read by query heads of both halves: each head gets its own
    k, v = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
  halves = zip(*(jnp.split(x, 2, axis=2) for x in (q, k, v)))
  outs = [attend(*qkv, mask=dataclasses.replace(mask, group=size, group_shift=shift))
          for qkv, shift in zip(halves, (0, size // 2))]
  return jnp.concatenate(outs, axis=2)


class Attention(nnx.Module):
  """q/k/v/o projections (with biases as `AttentionConfig.bias` says) around `ops.attention`
  (`lcjax.kernels.ops`)."""

  def __init__(self, cfg: AttentionConfig, wide: ModelWide, *, rngs: nnx.Rngs, ops=LOCAL):
    ops.check_attention_impl(cfg.impl)
    d, h, kvh, hd = wide.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q = normal_param(rngs, (d, h, hd), wide.init_std, ("embed", "heads", "head_dim"))
    self.k = normal_param(rngs, (d, kvh, hd), wide.init_std, ("embed", "kv_heads", "head_dim"))
    self.v = normal_param(rngs, (d, kvh, hd), wide.init_std, ("embed", "kv_heads", "head_dim"))
    self.o = normal_param(rngs, (h, hd, d), wide.output_init_std, ("heads", "head_dim", "embed"))
    zeros = lambda shape, axes: nnx.Param(jnp.zeros(shape, jnp.float32), logical_axes=axes)
    if cfg.bias != "none":
      self.q_bias = zeros((h, hd), ("heads", "head_dim"))
      self.k_bias = zeros((kvh, hd), ("kv_heads", "head_dim"))
      self.v_bias = zeros((kvh, hd), ("kv_heads", "head_dim"))
    if cfg.bias == "qkvo":
      self.o_bias = zeros((d,), ("embed",))
    self.bias = cfg.bias
    self.rope = cfg if cfg.position_encoding == "rope" else None  # a static (frozen) config
    self.dtype = wide.dtype
    self.mask = cfg.mask
    self.max_distance = cfg.max_distance
    self.s2_groups = cfg.s2_groups
    self.kernel = dict(impl=cfg.impl, block_q=cfg.block_q, block_kv=cfg.block_kv)
    self.ops = ops

  def _rotate(self, x: jax.Array, positions: jax.Array, seq_len) -> jax.Array:
    """RoPE (if configured) at the current length seq_len (int, or traced when decoding)."""
    if self.rope is None:
      return x
    c = self.rope
    return apply_rope(x, positions, c.rope_theta, scaling=c.rope_scaling,
                      partial_rotary_factor=c.partial_rotary_factor, seq_len=seq_len,
                      angle_dtype=c.rope_dtype)

  def _project(self, x: jax.Array):
    """x `[batch, seq, embed]` -> q, k, v before RoPE."""
    dt = x.dtype
    q = jnp.einsum("bsd,dhk->bshk", x, self.q[...].astype(dt))
    k = jnp.einsum("bsd,dhk->bshk", x, self.k[...].astype(dt))
    v = jnp.einsum("bsd,dhk->bshk", x, self.v[...].astype(dt))
    if self.bias != "none":
      q, k, v = (y + b[...].astype(dt) for y, b in ((q, self.q_bias), (k, self.k_bias),
                                                     (v, self.v_bias)))
    return q, k, v

  def _qkv(self, x: jax.Array, positions: jax.Array, seq_len):
    q, k, v = self._project(x)
    return self._rotate(q, positions, seq_len), self._rotate(k, positions, seq_len), v

  def _out(self, out: jax.Array) -> jax.Array:
    y = jnp.einsum("bshk,hkd->bsd", out, self.o[...].astype(out.dtype))
    return y + self.o_bias[...].astype(y.dtype) if self.bias == "qkvo" else y

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
    """x `[batch, seq, embed]`, segment_ids/positions `[batch, seq]` -> `[batch, seq, embed]`."""
    q, k, v = self._qkv(x, positions, x.shape[1])
    attend = functools.partial(self.ops.attention, segment_ids=segment_ids, positions=positions,
                               **self.kernel)
    if not self.s2_groups:
      return self._out(attend(q, k, v, mask=self.mask))
    return self._out(s2_attention(attend, q, k, v, self.mask, self.s2_groups))

  # --- decoding (one device; one document per row, left-padded to a common prompt length) ---

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    shape = (batch, max_len, self.k.shape[1], self.k.shape[2])
    return KVCache(k=jnp.zeros(shape, self.dtype), v=jnp.zeros(shape, self.dtype),
                   index=jnp.zeros((), jnp.int32), start=jnp.zeros((batch,), jnp.int32))

  def prefill(self, x: jax.Array, cache: KVCache, *, segment_ids: jax.Array | None = None,
              positions: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Attention over a prompt `[batch, k, embed]`, writing its keys/values into the empty
    `cache` (from `init_cache(batch, max_len)`, max_len >= k).

    segment_ids `[batch, k]`: None for all ones, else left padding (0) then the prompt (1);
    positions `[batch, k]` default to 0..k-1 (with padding: 0 at the first real token).
    Dynamic NTK and LongRoPE use the longest prompt's length (transformers: the largest
    position + 1), not the padded k.
    With max_distance the prompt runs token by token through the decoding step, at the
    positions slot - start (the defaults).
    """
    batch, seq, _ = x.shape
    if seq > cache.k.shape[1]:
      raise ValueError(f"Attention.prefill of {seq} tokens into a KV cache of max_len="
                       f"{cache.k.shape[1]}: pass max_len >= {seq} to init_cache.")
    if segment_ids is None:
      segment_ids = jnp.ones((batch, seq), jnp.int32)
    start = jnp.sum(segment_ids == 0, axis=1, dtype=jnp.int32)  # the padding is all in front
    if self.max_distance is not None:
      return self._prefill_by_steps(x, cache._replace(start=start))
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    q, k, v = self._qkv(x, positions, seq - jnp.min(start))
    y = self._out(LOCAL.attention(q, k, v, segment_ids, positions, mask=self.mask,
                                  **self.kernel))
    update = lambda buf, new: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype),
                                                           (0, 0, 0, 0))
    return y, KVCache(k=update(cache.k, k), v=update(cache.v, v),
                      index=jnp.asarray(seq, jnp.int32), start=start)

  def step(self, x: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One token `[batch, embed]` in slot cache.index -> (`[batch, embed]`, cache).

    Fails (ValueError; under jit, when the step runs) once cache.index reaches max_len.
    """
    _check_room(cache.index, cache.k.shape[1])
    return self._step(x, cache, cache.index + 1 - jnp.min(cache.start))

  def _step(self, x: jax.Array, cache: KVCache, seq_len) -> tuple[jax.Array, KVCache]:
    """`step` with RoPE at the current length seq_len (the longest row's tokens so far).

    The cache holds keys rotated when they were written, and a new token's q and k rotate at
    the length seen so far (dynamic NTK, LongRoPE): what transformers' generate does, since
    its cache also stores rotated keys and its rotary embedding recomputes inv_freq once the
    largest position grows past the cached length (`dynamic_rope_update`).
    """
    positions = (cache.index - cache.start)[:, None]
    raw_q, k, v = self._project(x[:, None])
    q, k = self._rotate(raw_q, positions, seq_len), self._rotate(k, positions, seq_len)
    start = (0, cache.index, 0, 0)
    ks = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start)
    vs = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start)
    sink_queries = None
    if self.max_distance is not None:
      # LM-Infinite: sink j beyond the window is seen at distance min(position - j, max):
      # its query rotates to position j + that distance (the key sits at position j).
      j = jnp.arange(self.mask.sinks, dtype=jnp.int32)
      capped = j + jnp.minimum(positions - j, self.max_distance)  # [batch, sinks]
      sink_queries = self._rotate(jnp.repeat(raw_q, self.mask.sinks, axis=1), capped, seq_len)
    out = attention_kernels.decode_attention(q, ks.astype(q.dtype), vs.astype(q.dtype),
                                             cache.index + 1, start=cache.start, mask=self.mask,
                                             sink_queries=sink_queries)
    return self._out(out)[:, 0], cache._replace(k=ks, v=vs, index=cache.index + 1)

  def _prefill_by_steps(self, x: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Prefill as `x.shape[1]` decoding steps (slot t at position t - start), RoPE at the
    longest prompt's length; for what the full-row kernels do not do (max_distance)."""
    seq = x.shape[1] - jnp.min(cache.start)

    def body(cache, x_t):
      y, cache = self._step(x_t, cache, seq)
      return cache, y

    cache, ys = jax.lax.scan(body, cache, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1), cache
