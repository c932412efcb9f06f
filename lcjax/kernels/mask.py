"""The attention mask every implementation shares (see `lcjax.kernels.attention`).

Query i sees key j iff they are in the same document, j is not after i, and, with a sliding
window, j is one of the last `window` tokens up to i or one of the first `sinks` tokens of the
document (attention sinks, StreamingLLM). "After" is by `Tokens.index`, the token's place in the
unpermuted row, so sequence layouts that reorder tokens keep the mask.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Tokens(NamedTuple):
  """What the mask needs to know about each token; each `[batch, seq]` int32."""
  segment_ids: jax.Array  # the packed document the token belongs to (0: padding)
  index: jax.Array  # its place in the original row: the causal order
  positions: jax.Array  # its position within its document: sinks are positions < sinks


def row_tokens(segment_ids: jax.Array, positions: jax.Array | None = None) -> Tokens:
  """Tokens of whole, unpermuted rows: index = 0..seq-1; positions default to the index."""
  batch, seq = segment_ids.shape
  index = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  return Tokens(segment_ids, index, index if positions is None else positions)


def check_mask_args(window: int | None, sinks: int) -> None:
  if window is not None and window < 1:
    raise ValueError(f"window={window} must be >= 1 (the token itself), or None for no window.")
  if sinks < 0:
    raise ValueError(f"sinks={sinks} must be >= 0.")


@dataclasses.dataclass(frozen=True)
class Mask:
  """The mask's options: a sliding window of `window` tokens (None: full causal) and `sinks`."""
  window: int | None = None
  sinks: int = 0

  def __post_init__(self):
    check_mask_args(self.window, self.sinks)


def visible(q: Tokens, kv: Tokens, *, window: int | None = None, sinks: int = 0) -> jax.Array:
  """bool `[batch, q_seq, kv_seq]`: which keys each query attends to (see the module doc)."""
  qi, kj = q.index[:, :, None], kv.index[:, None, :]
  mask = (q.segment_ids[:, :, None] == kv.segment_ids[:, None, :]) & (kj <= qi)
  if window is not None:
    mask &= (qi - kj < window) | (kv.positions[:, None, :] < sinks)
  return mask
