"""The sequence-mixing ops a mixer calls, on one device: `LocalOps`.

Mixers hold an ops object and call its methods; they never ask where the rows live. On one
device that object is `LocalOps` (the kernels of this package on whole rows); with rows split
over devices it is `lcjax.parallel.sequence.SequenceSharding`, with the same methods:

    attention(q, k, v, segment_ids, positions, *, mask, impl, block_q, block_kv) -> out
    ssd(x, dt, A, B, C, segment_ids, *, chunk_size, impl) -> y
    conv(u, weight, bias, segment_ids, *, part) -> out   (part: "x", "B" or "C")
    to_mamba_layout(x), from_mamba_layout(x)              (the token order Mamba-2 runs in)
    check_attention_impl(impl)                             (fails at build on an impl it lacks)

Shapes are those of the kernels (`lcjax.kernels.attention`, `.ssd`, `.conv`).
"""

import dataclasses

import jax

from lcjax.kernels.attention import attention
from lcjax.kernels.conv import causal_conv
from lcjax.kernels.mask import Mask
from lcjax.kernels.ssd import ssd


@dataclasses.dataclass(frozen=True)
class LocalOps:
  """Whole rows on one device: the kernels themselves, in the batch's own token order."""

  def check_attention_impl(self, impl: str) -> None:
    del impl  # every implementation runs on whole rows

  def attention(self, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                positions: jax.Array | None, *, mask: Mask, impl: str, block_q: int,
                block_kv: int) -> jax.Array:
    return attention(q, k, v, segment_ids, positions, mask=mask, impl=impl,
                     block_q=block_q, block_kv=block_kv)

  def ssd(self, x, dt, A, B, C, segment_ids, *, chunk_size: int, impl: str) -> jax.Array:
    return ssd(x, dt, A, B, C, chunk_size=chunk_size, segment_ids=segment_ids, impl=impl)[0]

  def conv(self, u, weight, bias, segment_ids, *, part: str) -> jax.Array:
    del part  # channels are where the weights are: nothing to place
    return causal_conv(u, weight, bias, segment_ids)

  def to_mamba_layout(self, x: jax.Array) -> jax.Array:
    return x

  def from_mamba_layout(self, x: jax.Array) -> jax.Array:
    return x


LOCAL = LocalOps()
