"""Sequence-parallel attention (ring, all-gather) on 8 fake CPU devices against the reference.

Each test draws unpermuted inputs, permutes them into a layout, runs `sequence_attention` on a
mesh, un-permutes the output and the gradients wrt q, k, v and compares them with
`reference_attention` on the unpermuted inputs. Blocks are smaller than each device's share, so
the tiles inside a device are exercised too. Inputs are fresh every run (the seed is printed).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from lcjax.kernels.attention import reference_attention
from lcjax.kernels.mask import Mask, row_tokens
from lcjax.parallel.layout import permutation, unpermute
from lcjax.parallel.mesh import MeshConfig, make_mesh
from lcjax.parallel.ring_attention import sequence_attention
from tests import numerics
from tests.numerics import F32, assert_close, positions_of


def random_segments(rng, batch, seq, shard_len):
  """Packed rows with one document boundary on a shard edge (if there is one)."""
  return numerics.random_segments(rng, batch, seq, max_docs=5,
                                  edges=np.arange(shard_len, seq, shard_len))


@functools.partial(jax.jit, static_argnames=("mask",))
def reference(q, k, v, segment_ids, positions, dout, *, mask):
  """(out, dq, dk, dv) of reference attention over whole, unpermuted rows."""
  tokens = row_tokens(segment_ids, positions)
  out, vjp = jax.vjp(lambda q, k, v: reference_attention(
      q, k, v, tokens, tokens, mask=mask)[0], q, k, v)
  return out, *vjp(dout)


def check_against_reference(rng, mesh, layout, method, *, segments=True, mask=Mask(), batch=2,
                            seq=64, heads=4, kv_heads=2, head_dim=8, block=4, kernel="blockwise"):
  shards = mesh.shape["sequence"]
  q = rng.standard_normal((batch, seq, heads, head_dim)).astype(np.float32)
  k, v = (rng.standard_normal((batch, seq, kv_heads, head_dim)).astype(np.float32)
          for _ in range(2))
  dout = rng.standard_normal(q.shape).astype(np.float32)
  if segments:
    segment_ids = random_segments(rng, batch, seq, seq // shards)
    positions = positions_of(segment_ids)
  else:
    segment_ids = np.ones((batch, seq), np.int32)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))
  want = reference(q, k, v, segment_ids, positions, dout, mask=mask)

  perm = permutation(layout, seq, shards)

  @jax.jit
  def run(q, k, v, segment_ids, positions, dout):
    attend = functools.partial(
        sequence_attention, segment_ids=segment_ids, mesh=mesh, layout=layout, method=method,
        mask=mask, block_q=block, block_kv=block, kernel=kernel,
        # positions=None (one document per row) is sequence_attention's own default.
        positions=positions if segments else None)
    out, vjp = jax.vjp(attend, q, k, v)
    return out, *vjp(dout)

  got = run(*(x[:, perm] for x in (q, k, v, segment_ids, positions, dout)))
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert_close(unpermute(g, layout, shards), w, F32, f"{name} (segment_ids={segment_ids})")


def sequence_mesh():
  """All 8 devices on one `sequence` axis, and no other axis."""
  return Mesh(np.asarray(jax.devices()), ("sequence",))


@pytest.mark.parametrize("method", ["ring", "allgather"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_sequence_mesh(rng, layout, method):
  check_against_reference(rng, sequence_mesh(), layout, method)


@pytest.mark.parametrize("other,layout,method", [
    ("data", "zigzag", "ring"),
    ("fsdp", "striped", "ring"),
    ("tensor", "contiguous", "ring"),
    ("tensor", "zigzag", "allgather"),
])
def test_two_axis_meshes(rng, other, layout, method):
  """2 x 4 meshes: batch or heads split over `other`, the sequence over 4 devices."""
  mesh = make_mesh(MeshConfig(**{"data": 1, other: 2, "sequence": 4}))
  check_against_reference(rng, mesh, layout, method, block=8)


def test_one_document_per_row(rng):
  check_against_reference(rng, sequence_mesh(), "striped", "ring", segments=False)


def test_sequence_axis_of_size_one(rng):
  """The default mesh of a run without sequence parallelism: a ring of one step."""
  mesh = make_mesh(MeshConfig(data=4, tensor=2))
  check_against_reference(rng, mesh, "contiguous", "ring", batch=4, block=16)


@pytest.mark.parametrize("layout,method", [("contiguous", "ring"), ("zigzag", "allgather")])
def test_window_and_sinks(rng, layout, method):
  """A window longer than a shard but much shorter than the row: the ring skips the steps that
  bring only old keys, unless they hold sinks."""
  check_against_reference(rng, sequence_mesh(), layout, method, mask=Mask(window=11, sinks=2))


def test_anchor_and_shifted_groups(rng):
  """Contiguous, causal: groups let the ring skip most steps, but every device's queries see
  the anchor on the first device, so that step is never skipped."""
  check_against_reference(rng, sequence_mesh(), "contiguous", "ring",
                          mask=Mask(anchor=True, group=16, group_shift=8))


@pytest.mark.parametrize("method", ["ring", "allgather"])
def test_pallas_kernel_for_the_per_block_work(rng, method):
  """The Pallas flash kernel (interpret mode here) as each block's work: it returns the lse the
  ring merges by, and its backward takes the merged out / lse."""
  mesh = make_mesh(MeshConfig(data=2, sequence=4))
  # Triton-shaped tiles (powers of two >= 16): each device's 16 tokens are one tile.
  check_against_reference(rng, mesh, "zigzag", method, head_dim=16,
                          mask=Mask(window=20, sinks=2), block=16, kernel="pallas")


def small_inputs(batch=2, seq=64, heads=4, kv_heads=2):
  q = jnp.zeros((batch, seq, heads, 8))
  kv = jnp.zeros((batch, seq, kv_heads, 8))
  return q, kv, kv, jnp.ones((batch, seq), jnp.int32), None


def test_zigzag_needs_two_chunks_per_shard():
  with pytest.raises(ValueError, match="must be a multiple of 16"):
    sequence_attention(*small_inputs(seq=72), mesh=sequence_mesh(), layout="zigzag")


def test_heads_must_divide_the_head_axis():
  mesh = make_mesh(MeshConfig(data=1, tensor=2, sequence=4))
  with pytest.raises(ValueError, match="kv_heads=1 must both be divisible"):
    sequence_attention(*small_inputs(kv_heads=1), mesh=mesh)


def test_unknown_method_and_missing_axis():
  with pytest.raises(ValueError, match="choose one of"):
    sequence_attention(*small_inputs(), mesh=sequence_mesh(), method="ulysses")
  with pytest.raises(ValueError, match="no sequence axis"):
    sequence_attention(*small_inputs(), mesh=Mesh(np.asarray(jax.devices()), ("data",)))


def test_ring_skips_steps_it_cannot_see(rng):
  """Contiguous, causal: NaN values on the last device reach only its own queries; the other
  devices never compute with that block (computed, 0 * NaN would spread the NaN)."""
  mesh, seq, shard_len = sequence_mesh(), 64, 8
  q, k, v = (jnp.asarray(rng.standard_normal((2, seq, 2, 8)), jnp.float32) for _ in range(3))
  segment_ids = jnp.ones((2, seq), jnp.int32)
  out = jax.jit(functools.partial(sequence_attention, mesh=mesh, method="ring", block_q=4,
                                  block_kv=4))(q, k, v.at[:, -shard_len:].set(jnp.nan),
                                               segment_ids, None)
  tokens = row_tokens(segment_ids)
  want, _ = reference_attention(q, k, v, tokens, tokens)
  assert_close(out[:, :-shard_len], want[:, :-shard_len], F32, "out before the NaN block")
  assert np.all(np.isnan(out[:, -shard_len:]))
