"""A new mask shape is one change in one place: a subclass of `Mask`, defined here in the test
only, or a field of `Mask`, is honoured by every attention implementation.

`DistanceLimit` (LM-Infinite's distance limit) additionally hides keys `max_distance` or more
tokens before the query, sinks included, and refines `live` to match. `ANCHOR_S2` is the shared
anchor (AnchorAttention) with shifted groups (S²-Attn): the anchor is seen across groups, so the
tiles that groups alone would skip must stay live where they hold it. Each implementation runs
with each shape and is compared, forward and (where differentiable) backward, with a float64 loop
that applies `mask.visible` directly, one query at a time.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.kernels.attention import decode_attention, reference_attention
from lcjax.kernels.blockwise_attention import blockwise_attention
from lcjax.kernels.flash_attention import flash_attention
from lcjax.kernels.mask import Mask, Tokens, block_ranges, row_tokens
from lcjax.parallel.layout import permutation, unpermute
from lcjax.parallel.mesh import MeshConfig, make_mesh
from lcjax.parallel.ring_attention import sequence_attention
from tests.kernels.test_attention import naive_attention
from tests.numerics import F32, assert_close, positions_of, random_qkv, random_segments


@dataclasses.dataclass(frozen=True)
class DistanceLimit(Mask):
  """The shared mask, and no key `max_distance` or more tokens before the query."""
  max_distance: int = 20

  def visible(self, q_seg, q_idx, q_pos, kv_seg, kv_idx, kv_pos):
    near = q_idx - kv_idx < self.max_distance
    return super().visible(q_seg, q_idx, q_pos, kv_seg, kv_idx, kv_pos) & near

  def live(self, q, kv):
    return super().live(q, kv) & (q.lo_index - kv.hi_index < self.max_distance)


MASK = DistanceLimit(window=6, sinks=2, max_distance=20)


def anchor_s2(seq: int) -> Mask:
  """The anchor, and groups of a quarter row shifted by half a group (LongLoRA's shifted half)."""
  return Mask(anchor=True, group=seq // 4, group_shift=seq // 8)


# Mask shapes by name, each for a row of `seq` tokens.
MASKS = {"distance_limit": lambda seq: MASK, "anchor_s2": anchor_s2}


def anchored(segment_ids: np.ndarray) -> np.ndarray:
  """Packed rows as the data builds them with an anchor: index 0 is a document of its own."""
  out = np.where(segment_ids > 0, segment_ids + 1, 0)
  out[:, 0] = 1
  return out


def visible_loop(mask: Mask, q: Tokens, kv: Tokens) -> np.ndarray:
  """bool `[batch, q_seq, kv_seq]`, one query at a time through `mask.visible`."""
  q, kv = (Tokens(*map(np.asarray, t)) for t in (q, kv))
  batch, q_seq = q.index.shape
  seen = np.zeros((batch, q_seq, kv.index.shape[1]), bool)
  for b in range(batch):
    for i in range(q_seq):
      seen[b, i] = mask.visible(*(x[b, i] for x in q), *(x[b] for x in kv))
  return seen


def _vjp(fn, q, k, v, dout, dlse):
  """(out, lse, dq, dk, dv) of fn(q, k, v) -> (out, lse)."""
  (out, lse), vjp = jax.vjp(fn, q, k, v)
  return out, lse, *vjp((dout, dlse))


def _kernel(fn, **kwargs):
  """A runner for `fn(q, k, v, q_tokens, kv_tokens, *, mask, ...) -> (out, lse)`."""
  @functools.partial(jax.jit, static_argnames="mask")
  def run(q, k, v, tokens, dout, dlse, *, mask):
    return _vjp(lambda q, k, v: fn(q, k, v, tokens, tokens, mask=mask, **kwargs), q, k, v,
                dout, dlse)
  return run


def _sequence(method):
  """A runner for `sequence_attention` on a data=2 x sequence=4 mesh, zigzag layout: out and
  the gradients of out (no lse), in the unpermuted order."""
  def run(q, k, v, tokens, dout, dlse, *, mask):
    del dlse
    mesh = make_mesh(MeshConfig(data=2, sequence=4))
    seq = q.shape[1]
    perm = permutation("zigzag", seq, 4)
    attend = functools.partial(
        sequence_attention, segment_ids=tokens.segment_ids[:, perm],
        positions=tokens.positions[:, perm], mesh=mesh, layout="zigzag", method=method,
        mask=mask, block_q=4, block_kv=4)
    out, vjp = jax.vjp(attend, *(x[:, perm] for x in (q, k, v)))
    grads = vjp(dout[:, perm])
    return unpermute(out, "zigzag", 4), None, *(unpermute(g, "zigzag", 4) for g in grads)
  return jax.jit(run, static_argnames="mask")


RUNNERS = {
    "reference": _kernel(reference_attention),
    "blockwise": _kernel(blockwise_attention, block_q=8, block_kv=8),
    "pallas_gpu": _kernel(flash_attention, block_q=16, block_kv=16, backend="gpu",
                          interpret=True),
    "pallas_tpu": _kernel(flash_attention, block_q=128, block_kv=128, backend="tpu",
                          interpret=True),
    "ring": _sequence("ring"),
    "allgather": _sequence("allgather"),
}
# The TPU frame's blocks are 128 tokens: two of them, the second partly padding.
SHAPES = {"pallas_tpu": dict(batch=1, q_seq=160, heads=2, kv_heads=1, head_dim=32)}


def random_tokens(rng, mask: Mask, batch: int, seq: int, max_docs: int) -> Tokens:
  seg = random_segments(rng, batch, seq, max_docs=max_docs)
  seg = anchored(seg) if mask.anchor else seg
  return row_tokens(jnp.asarray(seg), jnp.asarray(positions_of(seg)))


@pytest.mark.parametrize("shape", sorted(MASKS))
@pytest.mark.parametrize("impl", sorted(RUNNERS))
def test_every_implementation_honours_a_new_mask_shape(rng, impl, shape):
  size = SHAPES.get(impl, dict(batch=2, q_seq=64, heads=4, kv_heads=2, head_dim=16))
  q, k, v = random_qkv(rng, **size)
  batch, seq, heads, _ = q.shape
  mask = MASKS[shape](seq)
  tokens = random_tokens(rng, mask, batch, seq, max_docs=3)
  seg = np.asarray(tokens.segment_ids)
  dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  dlse = jnp.asarray(rng.standard_normal((batch, heads, seq)), jnp.float32)
  got = RUNNERS[impl](q, k, v, tokens, dout, dlse, mask=mask)
  want = naive_attention(q, k, v, visible_loop(mask, tokens, tokens), dout,
                         dlse if got[1] is not None else np.zeros(dlse.shape))
  for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
    if g is not None:
      assert_close(g, w, F32, f"{impl} {name} (segment_ids={seg})")


def test_decode_attention_honours_a_new_mask_shape(rng):
  """The last query of a prefix of `length` tokens over a cache of 48 slots."""
  max_len, length = 48, int(rng.integers(30, 49))
  q, k, v = random_qkv(rng, q_seq=max_len)
  got = decode_attention(q[:, length - 1:length], k, v, jnp.int32(length), mask=MASK)
  tokens = row_tokens(jnp.ones((2, length), jnp.int32))
  want, _ = naive_attention(q[:, :length], k[:, :length], v[:, :length],
                            visible_loop(MASK, tokens, tokens))
  assert_close(got, want[:, -1:], F32, f"length={length}")


def test_decode_attention_ignores_the_anchor(rng):
  """A decoded row is one document: with left padding (slot 0 is padding, not an anchor) and
  without, the anchor changes nothing."""
  max_len, length = 16, int(rng.integers(4, 17))
  q, k, v = random_qkv(rng, q_seq=max_len)
  start = jnp.asarray([0, int(rng.integers(1, length))], jnp.int32)
  step = jax.jit(decode_attention, static_argnames="mask")
  args = (q[:, length - 1:length], k, v, jnp.int32(length))
  np.testing.assert_array_equal(step(*args, start=start, mask=Mask(anchor=True)),
                                step(*args, start=start, mask=Mask()))


@pytest.mark.parametrize("shape", sorted(MASKS))
def test_live_is_conservative_and_refined(rng, shape):
  """`live` never drops a block pair that holds a visible pair, and skips pairs that causal
  documents alone keep: for the subclass sinks farther than max_distance, for groups the
  earlier groups (though not the anchor's block)."""
  seq, block = 96, 8
  mask = MASKS[shape](seq)
  tokens = random_tokens(rng, mask, 2, seq, max_docs=2)
  ranges = block_ranges(tokens, block)
  n = seq // block
  needed = visible_loop(mask, tokens, tokens).reshape(2, n, block, n, block).any(axis=(2, 4))
  live = np.asarray(mask.live_pairs(ranges, ranges))
  assert np.all(live[needed]), "a needed block pair is not live"
  shared = Mask(window=6, sinks=2) if shape == "distance_limit" else Mask()
  assert live.sum() < np.asarray(shared.live_pairs(ranges, ranges)).sum()
