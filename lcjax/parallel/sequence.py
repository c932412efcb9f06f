"""Sequence parallelism as the model sees it: one object that runs the sequence-mixing ops
(attention, the Mamba-2 conv and SSD) on rows split over the `sequence` mesh axis.

The loop builds a `SequenceSharding` from the mesh, the logical-axis rules and the gin
`SequenceConfig`, and hands it to the model (`LM(..., sequence=...)`). It is the mixers' ops
object (`lcjax.kernels.ops`): the same methods as `LocalOps`, for rows split over devices, so
mixers never branch on where the rows live. Everything else in the model is per token and needs
nothing: XLA shards it along the sequence like any other axis.

Layouts (`lcjax.parallel.layout`): the batch arrives already permuted into the layout. Ring and
all-gather attention take any layout (their mask follows each token's original index). The
Mamba-2 recurrence needs each device's tokens to be contiguous runs of the row: contiguous and
zigzag layouts are, striped is not, so under striped each Mamba-2 layer moves its input to the
contiguous order and its output back (two all-to-alls of `[batch, seq, d_model]` per layer) —
striped suits attention-heavy stacks; zigzag balances causal attention and keeps Mamba-2 local.
"""

import dataclasses

import gin
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lcjax.config import check_types
from lcjax.errors import ConfigError
from lcjax.kernels.mask import Mask
from lcjax.parallel import sharding
from lcjax.parallel.layout import LAYOUTS, check_layout
from lcjax.parallel.ring_attention import METHODS, sequence_attention
from lcjax.parallel.ssd_sharded import sharded_causal_conv, sharded_ssd


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SequenceConfig:
  """layout: how a row's tokens are dealt to the sequence shards (contiguous, zigzag, striped).
  attention: "ring" (k/v blocks passed around the ring, O(seq / N) memory per device) or
    "allgather" (k/v gathered whole: simpler, O(seq) memory, one collective).
  Each device's local attention is tiled by AttentionConfig.block_q / block_kv, with the kernel
  AttentionConfig.impl names ("blockwise" or "pallas"; "auto" is blockwise).
  """
  layout: str = "zigzag"
  attention: str = "ring"

  def __post_init__(self):
    check_types(self)
    if self.layout not in LAYOUTS:
      raise ConfigError(f"SequenceConfig.layout={self.layout!r} is not one of {LAYOUTS}.")
    if self.attention not in METHODS:
      raise ConfigError(f"SequenceConfig.attention={self.attention!r} is not one of "
                        f"{tuple(sorted(METHODS))}.")


# The attention impls ring / all-gather attention can run per block.
SEQUENCE_ATTENTION_IMPLS = ("auto", "blockwise", "pallas")


def _one_axis(axes):
  """A PartitionSpec entry -> a tuple of mesh axis names."""
  return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


@dataclasses.dataclass(frozen=True)
class SequenceSharding:
  """Where the sequence, batch and heads live on `mesh` (from the logical rules), and how."""
  mesh: Mesh
  config: SequenceConfig
  batch_axes: tuple[str, ...]
  seq_axis: str
  head_axis: str | None  # attention heads (and kv heads)
  ssm_head_axis: str | None  # Mamba-2 heads and their channels

  @classmethod
  def create(cls, mesh: Mesh, rules, config: SequenceConfig) -> "SequenceSharding | None":
    """None unless the rules put the sequence on a mesh axis of size > 1."""
    batch_axes, seq_axes = (_one_axis(a) for a in sharding.spec(sharding.BATCH_AXES, rules))
    seq_axes = tuple(a for a in seq_axes if mesh.shape[a] > 1)
    if not seq_axes:
      return None
    if len(seq_axes) > 1:
      raise ConfigError(f"The sequence is split over several mesh axes {seq_axes}; sequence "
                        "parallelism needs one: map 'seq' to a single axis in logical_rules.")
    head_axes = []
    for name in ("heads", "ssm_heads"):
      axes = _one_axis(sharding.spec((name,), rules)[0])
      if len(axes) > 1:
        raise ConfigError(f"'{name}' is split over several mesh axes {axes}; sequence "
                          f"parallelism supports one: map '{name}' to a single axis.")
      head_axes.append(axes[0] if axes else None)
    return cls(mesh, config, batch_axes, seq_axes[0], *head_axes)

  @property
  def shards(self) -> int:
    return self.mesh.shape[self.seq_axis]

  @property
  def layout(self) -> str:
    return self.config.layout

  def check(self, seq: int) -> None:
    check_layout(self.layout, seq, self.shards)

  def _axes(self):
    return dict(mesh=self.mesh, batch_axes=self.batch_axes, seq_axis=self.seq_axis)

  def check_attention_impl(self, impl: str) -> None:
    """Ring and all-gather attention run a tiled kernel on each block: "blockwise" (plain JAX)
    or "pallas"; "auto" is blockwise here. Fails, at build, for the whole-row ones."""
    if impl not in SEQUENCE_ATTENTION_IMPLS:
      raise ConfigError(
          f"AttentionConfig.impl={impl!r} cannot run with the sequence split over "
          f"{self.shards} devices: ring / all-gather attention run a tiled kernel per block. "
          f"Set AttentionConfig.impl to one of {SEQUENCE_ATTENTION_IMPLS} ('auto' is "
          f"blockwise here), or MeshConfig.sequence = 1.")

  def attention(self, q, k, v, segment_ids, positions, *, mask: Mask, impl: str, block_q: int,
                block_kv: int):
    """q `[batch, seq, heads, head_dim]`, k, v `[batch, seq, kv_heads, head_dim]`, all in the
    layout's order -> out like q, each device's share in tiles of block_q x block_kv."""
    self.check_attention_impl(impl)
    return sequence_attention(q, k, v, segment_ids, positions, layout=self.layout,
                              method=self.config.attention, mask=mask,
                              head_axis=self.head_axis, block_q=block_q,
                              block_kv=block_kv,
                              kernel="pallas" if impl == "pallas" else "blockwise",
                              **self._axes())

  def mamba_layout(self) -> str:
    """The layout the Mamba-2 ops run in: the batch's own, except striped -> contiguous."""
    return "contiguous" if self.layout == "striped" else self.layout

  def conv(self, u, weight, bias, segment_ids, *, part: str):
    """part: which conv input ("x", "B", "C"). x's channels are split with the Mamba-2 heads;
    B and C are shared by all heads, so replicated over the head axis (see the rules)."""
    channel_axis = self.ssm_head_axis if part == "x" else None
    return sharded_causal_conv(u, weight, bias, segment_ids, layout=self.mamba_layout(),
                               channel_axis=channel_axis, **self._axes())

  def ssd(self, x, dt, A, B, C, segment_ids, *, chunk_size: int, impl: str):
    """y of `lcjax.kernels.ssd.ssd` over rows split across devices (states cross shards)."""
    return sharded_ssd(x, dt, A, B, C, segment_ids, layout=self.mamba_layout(),
                       chunk_size=chunk_size, head_axis=self.ssm_head_axis, impl=impl,
                       **self._axes())

  def _constrain(self, x):
    spec = P(self.batch_axes or None, self.seq_axis, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def to_mamba_layout(self, x):
    """`[batch, seq, ...]` in the batch's layout -> in `mamba_layout()`. Striped position
    d*L + j holds token j*N + d, so the contiguous order is a transpose of [N, L] -> [L, N]."""
    if self.layout != "striped":
      return x
    b, s = x.shape[:2]
    n = self.shards
    y = x.reshape(b, n, s // n, *x.shape[2:]).swapaxes(1, 2).reshape(x.shape)
    return self._constrain(y)

  def from_mamba_layout(self, x):
    if self.layout != "striped":
      return x
    b, s = x.shape[:2]
    n = self.shards
    y = x.reshape(b, s // n, n, *x.shape[2:]).swapaxes(1, 2).reshape(x.shape)
    return self._constrain(y)
