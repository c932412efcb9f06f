"""Sequence-sharded SSD and causal conv on 8 fake CPU devices against one device.

Inputs are fresh every run (the seed is printed); x, dt, A, B, C are drawn as in
tests/kernels/test_ssd.py. Rows go in permuted into the layout's order and come back unpermuted,
and gradients are taken w.r.t. the unpermuted inputs, so every result is compared with the
single-device functions on the original rows, with tests/numerics.py's closeness check.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lcjax.kernels.conv import causal_conv
from lcjax.kernels.ssd import ssd_chunked, ssd_reference
from lcjax.parallel import layout as layouts
from lcjax.parallel.ssd_sharded import (
  sharded_causal_conv,
  sharded_ssd,
  sharded_ssd_shard,
)
from tests.kernels.test_ssd import random_inputs
from tests.numerics import F32, F32_GRAD, assert_close

# Sharded vs one device (chunked or scan), float32: the same arithmetic but for the incoming
# state, which enters through the per-piece correction instead of the chunk scan. Seen over 16
# runs: <= 2.3e-7 forward, <= 1.1e-6 gradients (dA); F32 and F32_GRAD leave room for chunked vs
# scan alone, which has shown 3e-5 in gradients. A wrong reset or decay gives errors of order 1.

# The conv is a handful of float32 products per output, in the same order either way.
CONV_TOL = 1e-6
CHUNK = 8
GRAD_NAMES = ("x", "dt", "A", "B", "C")


def make_mesh(axes: dict) -> Mesh:
  """A mesh with only the named axes (the entry points drop the others from their specs)."""
  return Mesh(np.asarray(jax.devices()).reshape(tuple(axes.values())), tuple(axes))


def piece_length(layout, seq, shards):
  return seq // (2 * shards if layout == "zigzag" else shards)


def edge_segments(rng, batch, seq, piece):
  """Segment ids `[batch, seq]` whose boundaries fall exactly on piece edges and inside pieces.

  Row 0: no boundary in its first three pieces (a document whose state crosses two piece
  edges), then two boundaries on piece edges (one on a shard edge of both layouts, one on any
  piece edge) and two inside pieces, one right after an edge (the conv halo is cut short
  there); ids alternate 1, 2, 1, ... (recurring ids are new documents).
  Every row ends in padding (id 0) starting anywhere in the last piece or on its first edge.
  The other rows are one document up to the padding: states cross every piece edge.
  """
  rows = np.ones((batch, seq), np.int32)
  edges = np.arange(3 * piece, seq - piece, piece)
  inside = np.array([t for t in range(3 * piece, seq - piece) if t % piece])
  starts = np.zeros(seq, bool)
  starts[rng.choice(edges[edges % (2 * piece) == 0])] = True  # zigzag's pieces pair up
  starts[rng.choice(edges)] = True
  starts[rng.choice(inside, size=1)] = True
  starts[rng.choice(edges) + 1] = True
  rows[0] = 1 + np.cumsum(starts) % 2
  for row in rows:
    row[seq - rng.integers(1, piece + 1):] = 0
  return rows


def permuted(fn, layout, shards, seq, along_seq):
  """fn on rows permuted into `layout`'s order (the args numbered in `along_seq`, and the
  segment ids), its `[batch, seq, ...]` output unpermuted."""
  perm = layouts.permutation(layout, seq, shards)
  inverse = np.argsort(perm)

  def run(*args, segment_ids):
    args = [a[:, perm] if i in along_seq else a for i, a in enumerate(args)]
    seg = None if segment_ids is None else segment_ids[:, perm]
    return fn(*args, seg)[:, inverse]
  return run


@functools.partial(jax.jit, static_argnums=0)
def value_and_grads(fn, args, segment_ids, projection):
  """fn(*args, segment_ids=...) and the gradients of <output, projection> w.r.t. every arg."""
  def loss(*args):
    out = fn(*args, segment_ids=segment_ids)
    return jnp.sum(out.astype(jnp.float32) * projection), out

  (_, out), grads = jax.value_and_grad(loss, argnums=range(len(args)), has_aux=True)(*args)
  return out, grads


# Module-level, so the two layouts of a case share their single-device compilations.
SINGLE_DEVICE_SSD = {
    "chunked": lambda *args, segment_ids: ssd_chunked(*args, chunk_size=CHUNK,
                                                      segment_ids=segment_ids)[0],
    "reference": lambda *args, segment_ids: ssd_reference(*args, segment_ids=segment_ids)[0],
}


# mesh axes, seq, groups (of 4 heads). Sequence alone (groups between 1 and heads); with batch
# sharding and pieces that are not multiples of the chunk (96 / 4 = 24, zigzag 12); with head
# sharding, B and C replicated (1 group) or split with the heads (4 groups, 2 per shard).
SSD_CASES = [
    ({"sequence": 8}, 128, 2),
    ({"data": 2, "sequence": 4}, 96, 1),
    ({"tensor": 2, "sequence": 4}, 64, 1),
    ({"tensor": 2, "sequence": 4}, 64, 4),
]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("axes,seq,groups", SSD_CASES)
def test_sharded_ssd_matches_one_device(rng, axes, seq, groups, layout):
  mesh = make_mesh(axes)
  shards = axes["sequence"]
  (x, dt, A, B, C), _ = random_inputs(rng, batch=2, seq=seq, heads=4, groups=groups,
                                      head_dim=4, d_state=8)
  args = tuple(map(jnp.asarray, (x, dt, A, B, C)))
  seg = jnp.asarray(edge_segments(rng, 2, seq, piece_length("zigzag", seq, shards)))
  projection = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  sharded = permuted(
      lambda x, dt, A, B, C, seg: sharded_ssd(x, dt, A, B, C, seg, mesh=mesh, layout=layout,
                                              chunk_size=CHUNK), layout, shards, seq,
      along_seq=(0, 1, 3, 4))
  y, grads = value_and_grads(sharded, args, seg, projection)
  what = f"{axes} {layout} groups={groups} segment_ids={np.asarray(seg)}"
  for impl, one_device in SINGLE_DEVICE_SSD.items():
    y_ref, grads_ref = value_and_grads(one_device, args, seg, projection)
    assert_close(y, y_ref, F32, f"y vs {impl}, {what}")
    for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref):
      assert_close(g, g_ref, F32_GRAD, f"d/d{name} vs {impl}, {what}")


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_sharded_ssd_without_segment_ids(rng, layout):
  mesh = make_mesh({"sequence": 8})
  (x, dt, A, B, C), _ = random_inputs(rng, batch=1, seq=64, heads=4, groups=1, head_dim=4)
  sharded = permuted(lambda *a: sharded_ssd(*a, mesh=mesh, layout=layout, chunk_size=CHUNK),
                     layout, 8, 64, along_seq=(0, 1, 3, 4))
  y = jax.jit(functools.partial(sharded, segment_ids=None))(x, dt, A, B, C)
  assert_close(y, ssd_reference(x, dt, A, B, C)[0], F32, f"y, {layout}")


def test_sharded_ssd_with_the_pallas_kernel(rng):
  """The Pallas SSD (interpret mode here) as each shard's local work, forward and gradients."""
  mesh, seq, layout = make_mesh({"data": 2, "sequence": 4}), 64, "zigzag"
  (x, dt, A, B, C), _ = random_inputs(rng, batch=2, seq=seq, heads=4, groups=1, head_dim=16,
                                      d_state=16)
  args = tuple(map(jnp.asarray, (x, dt, A, B, C)))
  seg = jnp.asarray(edge_segments(rng, 2, seq, piece_length(layout, seq, 4)))
  projection = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  sharded = permuted(
      lambda x, dt, A, B, C, seg: sharded_ssd(x, dt, A, B, C, seg, mesh=mesh, layout=layout,
                                              chunk_size=16, impl="pallas"),
      layout, 4, seq, along_seq=(0, 1, 3, 4))
  y, grads = value_and_grads(sharded, args, seg, projection)
  y_ref, grads_ref = value_and_grads(SINGLE_DEVICE_SSD["reference"], args, seg, projection)
  assert_close(y, y_ref, F32, "y")
  for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref):
    assert_close(g, g_ref, F32_GRAD, f"d/d{name}")


def test_mesh_without_sequence_axis(rng):
  """Batch and heads sharded, whole rows per device: plain `ssd` under shard_map."""
  mesh, seq = make_mesh({"data": 2, "tensor": 4}), 32
  (x, dt, A, B, C), _ = random_inputs(rng, batch=2, seq=seq, heads=4, groups=4, head_dim=4)
  seg = edge_segments(rng, 2, seq, 4)
  y = jax.jit(lambda *a: sharded_ssd(*a, mesh=mesh, chunk_size=CHUNK))(x, dt, A, B, C, seg)
  assert_close(y, ssd_reference(x, dt, A, B, C, segment_ids=seg)[0], F32, "y")


@pytest.mark.parametrize("layout,impl", [("zigzag", "chunked"), ("contiguous", "reference")])
def test_final_state_on_every_shard(rng, layout, impl):
  """The per-device function's final state is the row's, on every shard of the axis."""
  mesh, seq = make_mesh({"sequence": 8}), 64
  (x, dt, A, B, C), _ = random_inputs(rng, batch=2, seq=seq, heads=4, groups=2, head_dim=4)
  seg = edge_segments(rng, 2, seq, piece_length("zigzag", seq, 8))
  seg[1, -1] = 3  # row 1 ends in a one-token document after its padding, row 0 in padding
  perm = layouts.permutation(layout, seq, 8)

  def local(x, dt, A, B, C, seg):
    y, final = sharded_ssd_shard(x, dt, A, B, C, seg, axis_name="sequence", layout=layout,
                                 chunk_size=CHUNK, impl=impl)
    return y, final[None]

  seq_spec = P(None, "sequence")
  y, finals = jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(seq_spec, seq_spec, P(), seq_spec, seq_spec, seq_spec),
      out_specs=(seq_spec, P("sequence"))))(x[:, perm], dt[:, perm], A, B[:, perm], C[:, perm],
                                           seg[:, perm])
  y_ref, final_ref = ssd_reference(x, dt, A, B, C, segment_ids=seg)
  assert_close(np.asarray(y)[:, np.argsort(perm)], y_ref, F32, "y")
  for shard, final in enumerate(finals):
    assert_close(final, final_ref, F32, f"final state on shard {shard}, {seg}")


# mesh axes, channel axis, layout, with segment ids; 64 tokens, d_conv 4 (a halo of 3). Zigzag
# on 8 shards has pieces of 4: a halo reaches all but one token of the previous piece.
CONV_CASES = [
    ({"sequence": 8}, None, "contiguous", True),
    ({"sequence": 8}, None, "zigzag", True),
    ({"sequence": 8}, None, "zigzag", False),
    ({"tensor": 2, "sequence": 4}, "tensor", "contiguous", True),
    ({"tensor": 2, "sequence": 4}, "tensor", "zigzag", True),
]


@pytest.mark.parametrize("axes,channel_axis,layout,with_segments", CONV_CASES)
def test_sharded_causal_conv_matches_one_device(rng, axes, channel_axis, layout, with_segments):
  seq = 64
  mesh, shards, d_conv, channels = make_mesh(axes), axes["sequence"], 4, 6
  u = jnp.asarray(rng.standard_normal((2, seq, channels)), jnp.float32)
  weight = jnp.asarray(rng.standard_normal((d_conv, channels)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(channels), jnp.float32)
  seg = None
  if with_segments:
    seg = jnp.asarray(edge_segments(rng, 2, seq, piece_length("zigzag", seq, shards)))
  projection = jnp.asarray(rng.standard_normal(u.shape), jnp.float32)

  sharded = permuted(
      lambda u, w, b, seg: sharded_causal_conv(u, w, b, seg, mesh=mesh, layout=layout,
                                               channel_axis=channel_axis), layout, shards, seq,
      along_seq=(0,))
  one_device = lambda u, w, b, segment_ids: causal_conv(u, w, b, segment_ids)
  out, grads = value_and_grads(sharded, (u, weight, bias), seg, projection)
  out_ref, grads_ref = value_and_grads(one_device, (u, weight, bias), seg, projection)
  what = f"{axes} {layout} segment_ids={None if seg is None else np.asarray(seg)}"
  assert_close(out, out_ref, CONV_TOL, f"out, {what}")
  for name, g, g_ref in zip(("u", "weight", "bias"), grads, grads_ref):
    assert_close(g, g_ref, CONV_TOL, f"d/d{name}, {what}")


def test_errors_name_the_fix(rng):
  seq_mesh = make_mesh({"sequence": 8})
  (x, dt, A, B, C), _ = random_inputs(rng, batch=1, seq=72, heads=4, groups=2, head_dim=4)
  seg = np.ones((1, 72), np.int32)
  with pytest.raises(ValueError, match="must be a multiple of 16"):
    sharded_ssd(x, dt, A, B, C, seg, mesh=seq_mesh, layout="zigzag")
  with pytest.raises(ValueError, match="Relayout striped sequences to 'contiguous'"):
    sharded_ssd(x, dt, A, B, C, seg, mesh=seq_mesh, layout="striped")
  with pytest.raises(ValueError, match="ngroups=2 cannot be split"):
    sharded_ssd(x, dt, A, B, C, seg, mesh=make_mesh({"tensor": 4, "sequence": 2}))

  u, weight, bias = (np.ones(shape, np.float32) for shape in ((1, 32, 2), (4, 2), (2,)))
  with pytest.raises(ValueError, match="at least d_conv - 1 = 3 tokens"):
    sharded_causal_conv(u, weight, bias, seg[:, :32], mesh=seq_mesh, layout="zigzag")
  with pytest.raises(ValueError, match="Relayout striped"):
    sharded_causal_conv(u, weight, bias, None, mesh=seq_mesh, layout="striped")
