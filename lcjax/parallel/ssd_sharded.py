"""Mamba-2 with the sequence sharded: the SSD scan and the causal conv across sequence shards.

Inside `jax.shard_map`, each device of the sequence axis (N shards) holds `pieces` contiguous
runs of the global row, in the sequence layout's order (`lcjax.parallel.layout`):

    contiguous   1 piece:  global piece d of N
    zigzag       2 pieces: global pieces d and 2N-1-d of 2N, held in that order
    striped      unsupported: every token is its own piece, so the carry would cross shards at
                 every token; striped rows are to be relayouted to contiguous before Mamba layers.

SSD (`sharded_ssd_shard`). The recurrence is linear in the state, so the output of a piece is
its output from a zero state plus the incoming state's contribution, C_t . (decay * h_in):

  1. Each device runs `ssd` on its pieces from a zero state (the pieces folded into the batch,
     one call): y0 and the state each piece leaves behind from its own inputs, h_piece.
  2. Per piece, the transfer: the factor by which an entering state survives to the piece's
     end, exp(sum of dt * A over the piece) per (batch, head), or 0 if a document starts inside
     the piece; and its first and last segment ids.
  3. One all_gather of those over the sequence axis (N * pieces states, plus scalars); every
     device then runs the same short scan over the global pieces in row order,
         h_in[k] = 0 if piece k starts a document else transfer[k-1] * h_in[k-1] + h_piece[k-1],
     and picks out its own pieces' h_in. The scan's last carry is the row's final state.
  4. y = y0 + C_t . (exp(sum of dt * A from the piece start to t) * h_in) for the tokens still
     in the piece's first document; zero after a boundary inside the piece.

Step 4 costs one einsum the size of the chunked algorithm's own "state -> output" step, instead
of a second `ssd` pass from h_in. The gathered states are N * pieces times one state per device;
a log(N)-step ppermute prefix scan would move fewer bytes for large N, at log(N) latency-bound
steps instead of one collective. Everything is differentiable as written: all_gather's transpose
is a reduce-scatter, so gradients reach the states (and through them x, dt, A, B) of earlier
shards without a custom VJP.

Causal conv (`sharded_causal_conv_shard`). A token's conv window reaches d_conv - 1 tokens back,
possibly into the previous piece, so each piece gets that many trailing inputs (and their
segment ids) of its global predecessor as a halo, prepended before `causal_conv`. The halos move
by `lax.ppermute`, point to point and halo-sized (see that function for zigzag).

Precision: as `ssd`: decays, their sums and exponentials, the states and the scan are float32;
the correction's einsum takes C and h_in in x.dtype and accumulates in float32. y0 is already
rounded to x.dtype, so for bfloat16 the sum rounds twice.

Shapes are `ssd`'s (`lcjax.kernels.ssd`), local to the device; segment_ids `[batch, seq]` int32
or None (one document per row).
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lcjax.errors import ConfigError
from lcjax.kernels.conv import causal_conv
from lcjax.kernels.ssd import ssd
from lcjax.kernels.ssd_common import document_starts, pass_states
from lcjax.parallel.layout import LAYOUTS, check_layout
from lcjax.parallel.mesh import axes_size, present_axes

f32 = jnp.float32


def _pieces(layout: str) -> int:
  """How many contiguous runs of the row one shard holds in `layout`."""
  if layout == "contiguous":
    return 1
  if layout == "zigzag":
    return 2
  if layout == "striped":
    raise ConfigError(
        "Mamba layers cannot run on the 'striped' sequence layout: each shard holds every N-th "
        "token, so the state would have to cross shards at every token. Relayout striped "
        "sequences to 'contiguous' (or 'zigzag') before Mamba layers, or use one of those "
        "layouts for the whole model.")
  raise ValueError(f"Unknown sequence layout {layout!r}; choose one of {LAYOUTS}.")


def _split_pieces(a: jax.Array, pieces: int) -> jax.Array:
  """`[batch, pieces * L, ...]` -> `[pieces * batch, L, ...]`, piece-major."""
  batch, seq = a.shape[:2]
  a = a.reshape(batch, pieces, seq // pieces, *a.shape[2:])
  return jnp.moveaxis(a, 1, 0).reshape(pieces * batch, seq // pieces, *a.shape[3:])


def _merge_pieces(a: jax.Array, pieces: int) -> jax.Array:
  """The inverse of `_split_pieces`."""
  batch, length = a.shape[0] // pieces, a.shape[1]
  a = a.reshape(pieces, batch, length, *a.shape[2:])
  return jnp.moveaxis(a, 0, 1).reshape(batch, pieces * length, *a.shape[3:])


def _row_order(a: jax.Array, layout: str) -> jax.Array:
  """Per-shard values gathered as `[shards, pieces, ...]` -> `[shards * pieces, ...]` in the
  row's order: zigzag's global piece g is shard g's first piece for g < N, else shard 2N-1-g's
  second."""
  if layout == "contiguous":
    return a[:, 0]
  return jnp.concatenate([a[:, 0], a[::-1, 1]])


def _own_pieces(layout: str, shards: int, shard) -> jax.Array:
  """int32 `[pieces]`: the row-order indices of the pieces shard `shard` holds, in its order."""
  if layout == "contiguous":
    return jnp.reshape(shard, (1,)).astype(jnp.int32)
  return jnp.stack([shard, 2 * shards - 1 - shard]).astype(jnp.int32)


def _varying_zeros(shape, *like) -> jax.Array:
  """float32 zeros that vary over every mesh axis any of `like` varies over (shard_map's vma).

  A scan's carry must vary like its body's output, and zeros made from nothing vary over no
  axis, so `ssd` gets these as its initial state instead of making its own. zeros_like keeps
  its argument's varying axes and a sum takes their union.
  """
  zero = sum(jnp.zeros_like(a, f32, shape=()) for a in like)
  return jnp.broadcast_to(zero, shape)


def _states_in(h_piece, transfer, segp, *, axis_name: str, layout: str):
  """Step 3 of `sharded_ssd_shard`: the state entering each of this shard's pieces, and the
  row's final state, from every piece's own state and transfer (gathered over `axis_name`).

  h_piece `[pieces * batch, heads, head_dim, d_state]`, transfer `[pieces * batch, heads]`,
  segp `[pieces * batch, length]`, piece-major. Returns (h_in like h_piece, final state
  `[batch, heads, head_dim, d_state]`).
  """
  pieces = _pieces(layout)
  batch = h_piece.shape[0] // pieces
  per_piece = lambda v: v.reshape(pieces, batch, *v.shape[1:])
  info = (h_piece, transfer, segp[:, 0], segp[:, -1])
  gathered = lax.all_gather(tuple(map(per_piece, info)), axis_name)  # each [shards, pieces, ...]
  h_all, transfer_all, first_all, last_all = (_row_order(v, layout) for v in gathered)
  # A state enters piece k only from piece k-1 in the same document; piece 0 starts the row.
  resets = jnp.concatenate([jnp.ones_like(first_all[:1], bool), first_all[1:] != last_all[:-1]])
  # The carry starts from zeros like the gathered states, varying over the same mesh axes.
  final_state, h_in_all = pass_states(transfer_all, h_all, resets=resets)
  own = _own_pieces(layout, lax.axis_size(axis_name), lax.axis_index(axis_name))
  return jnp.take(h_in_all, own, axis=0).reshape(h_piece.shape), final_state


def sharded_ssd_shard(x, dt, A, B, C, segment_ids, *, axis_name: str, layout: str,
                      chunk_size: int = 256, impl: str = "chunked"):
  """`ssd` over a row whose sequence is split over the mesh axis `axis_name` (inside shard_map).

  x `[batch, seq_local, heads, head_dim]` etc. as `ssd`, each device's tokens in `layout`'s
  order (see the module doc); the pieces need not be multiples of chunk_size (`ssd` pads).
  Returns (y like x, the row's final state `[batch, heads, head_dim, d_state]` float32, the same
  on every shard of the axis). No initial state: the row starts from zeros.
  """
  pieces = _pieces(layout)
  batch, seq, heads, head_dim = x.shape
  groups, d_state = B.shape[-2:]
  if seq % pieces:
    raise ValueError(f"The {layout!r} layout needs a local sequence that is a multiple of "
                     f"{pieces}, got {seq}; see lcjax.parallel.layout.check_layout.")
  length = seq // pieces

  split = lambda a: _split_pieces(a, pieces)
  xp, dtp, Bp, Cp = map(split, (x, dt, B, C))  # [pieces * batch, length, ...]
  if segment_ids is None:
    segp = jnp.zeros((pieces * batch, length), jnp.int32)
  else:
    segp = split(segment_ids)

  # 1. Each piece from a zero state.
  zeros = _varying_zeros((pieces * batch, heads, head_dim, d_state), x, dt, A, B, C, segp)
  y0, h_piece = ssd(xp, dtp, A, Bp, Cp, chunk_size=chunk_size,
                    segment_ids=None if segment_ids is None else segp, initial_state=zeros,
                    impl=impl)

  # 2. What the pieces tell the others. The incoming state's log-decay to position t of its
  # piece, a plain prefix sum: its error is relative to its own size.
  a = dtp.astype(f32) * A.astype(f32)  # [pieces * batch, length, heads]
  from_start = jnp.cumsum(a, axis=1)
  starts = document_starts(segp, pieces * batch, length)
  in_first_doc = jnp.cumsum(starts, axis=1) == 0  # [pieces * batch, length]
  transfer = jnp.exp(from_start[:, -1]) * in_first_doc[:, -1:]  # [pieces * batch, heads]

  # 3. Gather over the shards, scan over the global pieces in row order.
  h_in, final_state = _states_in(h_piece, transfer, segp, axis_name=axis_name, layout=layout)

  # 4. The incoming state's contribution, for the tokens of the piece's first document. Heads
  # split as (group, head within group) so C stays per group, as in ssd_chunked.
  per_group = heads // groups
  cdt = x.dtype
  h_in = h_in.reshape(pieces * batch, groups, per_group, head_dim, d_state)
  y_in = jnp.einsum("blgn,bgrpn->blgrp", Cp.astype(cdt), h_in.astype(cdt),
                    preferred_element_type=f32)
  decay = jnp.exp(from_start) * in_first_doc[..., None]  # [pieces * batch, length, heads]
  y_in = y_in.reshape(pieces * batch, length, heads, head_dim) * decay[..., None]
  y = (y0.astype(f32) + y_in).astype(cdt)
  return _merge_pieces(y, pieces), final_state


def sharded_causal_conv_shard(u, weight, bias, segment_ids, *, axis_name: str, layout: str):
  """`causal_conv` over a row whose sequence is split over `axis_name` (inside shard_map).

  u `[batch, seq_local, channels]` in `layout`'s order, weight `[d_conv, channels]`, bias
  `[channels]`, segment_ids `[batch, seq_local]` or None. Every piece must be at least
  d_conv - 1 tokens long (the halo comes from the one previous piece). Returns like u.

  Halos travel by ppermute. Contiguous: shard d-1 -> d. Zigzag: a first piece's predecessor is
  the previous shard's first piece (d-1 -> d); a second piece's (global 2N-1-d) is the next
  shard's second piece (global 2N-2-d, on shard d+1 -> d), except on the last shard, where it
  is its own first piece (global N-1). Two halo-sized sends, where an all_gather would move N
  times that to every shard. The row's first piece gets no halo: ppermute leaves zeros there,
  and zero inputs add nothing to the conv whatever their segment ids.
  """
  pieces = _pieces(layout)
  batch, seq, channels = u.shape
  halo = weight.shape[0] - 1
  if halo == 0:
    return causal_conv(u, weight, bias, segment_ids)
  if seq % pieces or seq // pieces < halo:
    raise ConfigError(
        f"The sharded causal conv needs every piece of the {layout!r} layout to hold at least "
        f"d_conv - 1 = {halo} tokens; this shard holds {seq} tokens in {pieces} piece(s). Use "
        f"a longer sequence or fewer sequence shards.")
  shards = lax.axis_size(axis_name)
  shard = lax.axis_index(axis_name)

  up = _split_pieces(u, pieces)  # [pieces * batch, length, channels]
  segp = None if segment_ids is None else _split_pieces(segment_ids, pieces)
  tail = lambda a: None if a is None else a[:, -halo:].reshape(pieces, batch, halo, *a.shape[2:])
  tails = (tail(up), tail(segp))

  forward = [(i, i + 1) for i in range(shards - 1)]
  first = lax.ppermute(tails, axis_name, forward)  # pytree: None passes through
  first = jax.tree.map(lambda a: a[0], first)
  if pieces == 1:
    halos = jax.tree.map(lambda a: a[None], first)
  else:
    backward = [(i + 1, i) for i in range(shards - 1)]
    second = lax.ppermute(jax.tree.map(lambda a: a[1], tails), axis_name, backward)
    own_first = jax.tree.map(lambda a: a[0], tails)
    second = jax.tree.map(lambda mine, theirs: jnp.where(shard == shards - 1, mine, theirs),
                          own_first, second)
    halos = jax.tree.map(lambda a, b: jnp.stack([a, b]), first, second)

  fold = lambda a: a.reshape(pieces * batch, halo, *a.shape[3:])
  halo_u, halo_seg = (None if a is None else fold(a) for a in halos)
  padded = jnp.concatenate([halo_u, up], axis=1)
  padded_seg = None if segp is None else jnp.concatenate([halo_seg, segp], axis=1)
  out = causal_conv(padded, weight, bias, padded_seg)[:, halo:]
  return _merge_pieces(out, pieces)


# --- global entry points ---


def _row_specs(mesh: Mesh, batch_axes, seq_axis, layout: str, seq: int):
  """(batch spec, sequence spec) of global rows over `mesh`, axes it lacks dropped; fails if
  `layout` cannot split `seq` tokens over the sequence axis (or is striped)."""
  batch_spec, seq_spec = present_axes(mesh, batch_axes), present_axes(mesh, seq_axis)
  if seq_spec is not None and not isinstance(seq_spec, str):
    raise ValueError(f"seq_axis must name one mesh axis, got {seq_axis!r}.")
  check_layout(layout, seq, axes_size(mesh, seq_spec))
  _pieces(layout)  # rejects striped
  return batch_spec, seq_spec


def _shard_map(local, mesh: Mesh, args, in_specs, segment_ids, segment_spec, out_specs,
               check_vma=True):
  """`local(*args, segment_ids)` under shard_map; segment ids None pass through as None (and
  take no spec), else they are split by `segment_spec`."""
  if segment_ids is None:
    fn = lambda *a: local(*a, None)
  else:
    fn = local
    in_specs, args = (*in_specs, segment_spec), (*args, segment_ids)
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs,
                       check_vma=check_vma)(*args)


def sharded_ssd(x, dt, A, B, C, segment_ids=None, *, mesh: Mesh, layout: str = "contiguous",
                chunk_size: int = 256, batch_axes=("data", "fsdp"), seq_axis="sequence",
                head_axis="tensor", impl: str = "chunked") -> jax.Array:
  """`ssd`'s y for global arrays whose rows are in `layout`'s permuted order
  (`layout.permute_batch`), sharded over `mesh`: batch over `batch_axes`, sequence over
  `seq_axis`, heads over `head_axis` (and B, C's groups with them when groups > 1, so a shard's
  heads read its own groups). Axes the mesh lacks are dropped; without `seq_axis` each device
  runs `ssd` on whole rows. The pieces need not be multiples of chunk_size (`ssd` pads each).
  Returns y in the same order and sharding as x.
  """
  batch_spec, seq_spec = _row_specs(mesh, batch_axes, seq_axis, layout, x.shape[1])
  head = present_axes(mesh, head_axis)
  heads, groups = x.shape[2], B.shape[2]
  tensor = axes_size(mesh, head)
  if heads % tensor:
    raise ConfigError(f"heads={heads} cannot be split over the {tensor} devices of head axis "
                      f"{head!r}; use a multiple of {tensor} heads or a smaller head axis.")
  if groups > 1 and groups % tensor:
    raise ConfigError(
        f"ngroups={groups} cannot be split with the heads over the {tensor} devices of head axis "
        f"{head!r} (each shard's heads must read only its own groups). Use ngroups=1 or a "
        f"multiple of {tensor}, or a smaller head axis.")
  group = head if groups > 1 else None

  def local(x, dt, A, B, C, segment_ids):
    if seq_spec is None:  # whole rows on each device
      zeros = _varying_zeros((x.shape[0], *x.shape[2:], B.shape[-1]), x, dt, A, B, C)
      return ssd(x, dt, A, B, C, chunk_size=chunk_size, segment_ids=segment_ids,
                 initial_state=zeros, impl=impl)[0]
    return sharded_ssd_shard(x, dt, A, B, C, segment_ids, axis_name=seq_spec, layout=layout,
                             chunk_size=chunk_size, impl=impl)[0]

  specs = [P(batch_spec, seq_spec, head, None), P(batch_spec, seq_spec, head), P(head),
           P(batch_spec, seq_spec, group, None), P(batch_spec, seq_spec, group, None)]
  # pallas_call outputs carry no varying-axes annotation, so shard_map cannot check them.
  return _shard_map(local, mesh, (x, dt, A, B, C), specs, segment_ids, P(batch_spec, seq_spec),
                    P(batch_spec, seq_spec, head, None), check_vma=impl != "pallas")


def sharded_causal_conv(u, weight, bias, segment_ids=None, *, mesh: Mesh,
                        layout: str = "contiguous", batch_axes=("data", "fsdp"),
                        seq_axis="sequence", channel_axis=None) -> jax.Array:
  """`causal_conv` for global u `[batch, seq, channels]` in `layout`'s permuted order, sharded
  over `mesh` (batch over `batch_axes`, sequence over `seq_axis`, channels over `channel_axis`,
  weight `[d_conv, channels]` and bias with them). Axes the mesh lacks are dropped."""
  batch_spec, seq_spec = _row_specs(mesh, batch_axes, seq_axis, layout, u.shape[1])
  channel = present_axes(mesh, channel_axis)

  def local(u, weight, bias, segment_ids):
    if seq_spec is None:
      return causal_conv(u, weight, bias, segment_ids)
    return sharded_causal_conv_shard(u, weight, bias, segment_ids, axis_name=seq_spec,
                                     layout=layout)

  specs = [P(batch_spec, seq_spec, channel), P(None, channel), P(channel)]
  return _shard_map(local, mesh, (u, weight, bias), specs, segment_ids, P(batch_spec, seq_spec),
                    P(batch_spec, seq_spec, channel))
