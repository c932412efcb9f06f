"""The attention mask every implementation shares (see `lcjax.kernels.attention`).

Query i sees key j iff they are in the same document, j is not after i, with a sliding window
j is one of the last `window` tokens up to i or one of the first `sinks` tokens of the document
(attention sinks, StreamingLLM), and with groups (LongLoRA's S²-Attn) i and j fall in the same
group of `group` tokens, the groups shifted by `group_shift`. "After" and the groups are by
`Tokens.index`, the token's place in the unpermuted row, so sequence layouts that reorder tokens
keep the mask. With `anchor` (AnchorAttention), every real query also sees the row's first token
(index 0) whatever the rules above: one anchor shared by all documents of a packed row.

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
  anchor: every real query (segment > 0) sees the real key at index 0 too; padding queries
  keep seeing only their own segment.
  group: None, or queries see only keys in their group: index + group_shift, divided by group.
  """
  window: int | None = None
  sinks: int = 0
  anchor: bool = False
  group: int | None = None
  group_shift: int = 0

  def __post_init__(self):
    if self.window is not None and self.window < 1:
      raise ValueError(f"window={self.window} must be >= 1 (the token itself), or None for no "
                       "window.")
    if self.sinks < 0:
      raise ValueError(f"sinks={self.sinks} must be >= 0.")
    if self.group is not None and self.group < 1:
      raise ValueError(f"group={self.group} must be >= 1 (tokens), or None for no groups.")
    if not 0 <= self.group_shift < (self.group or 1):
      raise ValueError(f"group_shift={self.group_shift} must be in [0, group={self.group}).")

  def _group_of(self, index):
    # Floor division: padded query rows have index -1; they see nothing by segment anyway.
    return (index + self.group_shift) // self.group

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
    if self.group is not None:
      mask &= self._group_of(q_idx) == self._group_of(kv_idx)
    if self.anchor:
      # Padding keys (segment <= 0) are never the anchor: a left-padded decode cache has one at
      # slot 0. The anchor is before every query: no causal test needed.
      mask |= (kv_idx == 0) & (kv_seg > 0) & (q_seg > 0)
    return mask

  def live(self, q: Ranges, kv: Ranges):
    """bool: False only if no query of the q block can see a key of the kv block (`visible`,
    on ranges; conservative: True does not promise a visible pair)."""
    live = ((kv.lo_index <= q.hi_index) & (kv.lo_segment <= q.hi_segment)
            & (q.lo_segment <= kv.hi_segment))
    if self.window is not None:
      near = q.lo_index - kv.hi_index < self.window
      live &= (near | (kv.lo_position < self.sinks)) if self.sinks else near
    if self.group is not None:  # the blocks' group ranges overlap
      live &= ((self._group_of(kv.lo_index) <= self._group_of(q.hi_index))
               & (self._group_of(q.lo_index) <= self._group_of(kv.hi_index)))
    if self.anchor:  # the kv block holds index 0 and a real key, the q block a real query
      live |= (kv.lo_index <= 0) & (kv.hi_segment > 0) & (q.hi_segment > 0)
    return live

  def dense(self, q: Tokens, kv: Tokens) -> jax.Array:
    """bool `[batch, q_seq, kv_seq]`: which keys each query sees."""
    rows = [x[:, :, None] for x in q]
    cols = [x[:, None, :] for x in kv]
    return self.visible(*rows, *cols)

  def live_pairs(self, q: Ranges, kv: Ranges) -> jax.Array:
    """Ranges `[batch, nq]` and `[batch, nk]` -> bool `[batch, nq, nk]`: `live` per pair."""
    return self.live(Ranges(*(x[:, :, None] for x in q)), Ranges(*(x[:, None, :] for x in kv)))
