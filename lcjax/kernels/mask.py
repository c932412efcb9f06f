"""The attention mask every implementation shares (see `lcjax.kernels.attention`).

Query i sees key j iff they are in the same document, j is not after i, and, with a sliding
window, j is one of the last `window` tokens up to i or one of the first `sinks` tokens of the
document (attention sinks, StreamingLLM). "After" is by `Tokens.index`, the token's place in the
unpermuted row, so sequence layouts that reorder tokens keep the mask.

`Mask` is the one definition: `Mask.visible` says, elementwise, which (query, key) pairs are
visible, and `Mask.live` says, from the token ranges of two blocks (`Ranges`), whether any pair
in them can be. Every implementation (reference, blockwise, the Pallas kernels, ring and
all-gather attention, decoding with a KV cache) builds its mask from `visible` and skips tiles by
`live`, so a new mask shape is a subclass or a new field here and nowhere else.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

FAR = 1 << 30  # beyond any index or position; differences of two stay within int32


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


class Ranges(NamedTuple):
  """Token ranges of blocks: arrays over blocks, or scalars inside a kernel. A block with no
  real token has lo = FAR > hi = -FAR, which `Mask.live` finds dead."""
  lo_index: Any
  hi_index: Any
  lo_segment: Any
  hi_segment: Any
  lo_position: Any


def block_ranges(tokens: Tokens, block: int, length: int | None = None) -> Ranges:
  """Ranges of each block of `block` tokens, `[batch, seq // block]` each, over the first
  `length` (the real) tokens: padding after them is left out."""
  batch, seq = tokens.index.shape
  real = jnp.arange(seq) < (seq if length is None else length)

  def lo(x):
    return jnp.where(real, x, FAR).reshape(batch, -1, block).min(-1)

  def hi(x):
    return jnp.where(real, x, -FAR).reshape(batch, -1, block).max(-1)

  return Ranges(lo(tokens.index), hi(tokens.index), lo(tokens.segment_ids),
                hi(tokens.segment_ids), lo(tokens.positions))


@dataclasses.dataclass(frozen=True)
class Mask:
  """Which keys each query sees (the module doc). Hashable: a static argument of the kernels.

  window: None for full causal attention, else the last `window` tokens up to the query (itself
  included); sinks: with a window, the first `sinks` tokens of every document stay visible.
  """
  window: int | None = None
  sinks: int = 0

  def __post_init__(self):
    if self.window is not None and self.window < 1:
      raise ValueError(f"window={self.window} must be >= 1 (the token itself), or None for no "
                       "window.")
    if self.sinks < 0:
      raise ValueError(f"sinks={self.sinks} must be >= 0.")

  def visible(self, q_seg, q_idx, q_pos, kv_seg, kv_idx, kv_pos):
    """bool, elementwise with broadcasting: does the query see the key? THE definition.

    Operators only, so it runs on jax and numpy arrays and inside Pallas kernels. q_pos is
    unused here; shapes that need it (a query-side position rule) have it.
    """
    del q_pos
    mask = (q_seg == kv_seg) & (kv_idx <= q_idx)
    if self.window is not None:
      near = q_idx - kv_idx < self.window
      mask &= (near | (kv_pos < self.sinks)) if self.sinks else near
    return mask

  def live(self, q: Ranges, kv: Ranges):
    """bool: False only if no query of the q block can see a key of the kv block (`visible`,
    on ranges; conservative: True does not promise a visible pair)."""
    live = ((kv.lo_index <= q.hi_index) & (kv.lo_segment <= q.hi_segment)
            & (q.lo_segment <= kv.hi_segment))
    if self.window is not None:
      near = q.lo_index - kv.hi_index < self.window
      live &= (near | (kv.lo_position < self.sinks)) if self.sinks else near
    return live

  def dense(self, q: Tokens, kv: Tokens) -> jax.Array:
    """bool `[batch, q_seq, kv_seq]`: which keys each query sees."""
    rows = [x[:, :, None] for x in q]
    cols = [x[:, None, :] for x in kv]
    return self.visible(*rows, *cols)

  def live_pairs(self, q: Ranges, kv: Ranges) -> jax.Array:
    """Ranges `[batch, nq]` and `[batch, nk]` -> bool `[batch, nq, nk]`: `live` per pair."""
    return self.live(Ranges(*(x[:, :, None] for x in q)), Ranges(*(x[:, None, :] for x in kv)))
