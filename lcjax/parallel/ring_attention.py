"""Attention over a sequence split across the `sequence` mesh axis: ring and all-gather.

Each device holds `L = seq / N` tokens of every row (in the order of a layout, see
`lcjax.parallel.layout`) and computes the attention of its own queries over all keys.

    ring        k, v and their Tokens travel around the ring with `lax.ppermute`; after N steps
                every device has seen every kv block. The partial (out, lse) of each block
                (`blockwise_fwd`) are merged by their log-sum-exp (`tiles.merge`). Memory: one
                extra kv block. The backward is a second ring in which dk, dv accumulators
                travel with their k, v, each device adding its share; after the full circle
                they are home.
    allgather   all-gather k and v, attend locally (`blockwise_attention`); autodiff turns the
                gather into a reduce-scatter of dk, dv. Memory: the whole kv sequence.

A ring step whose kv block the mask hides entirely from the local queries is skipped
(`Mask.live`, on the token ranges of the two blocks): with causal attention on the contiguous
layout device d skips the N-1-d steps that bring it later blocks, so the last device does all
the work; zigzag and striped give every device about the same amount. The mask compares
`Tokens.index`, the original token order, so any layout gives the same result.

The per-block work is a kernel of `lcjax.kernels` that returns the log-sum-exp: `blockwise`
(plain JAX, any backend) or `pallas` (the Pallas flash kernel; interpret mode on CPU), picked by
`kernel` (the model passes its `AttentionConfig.impl`: "pallas" selects the kernel, anything
else the blockwise path).

`ring_attention_shard` and `allgather_attention_shard` run inside `jax.shard_map`;
`sequence_attention` wraps them for global arrays.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lcjax.errors import ConfigError
from lcjax.kernels import tiles
from lcjax.kernels.blockwise_attention import blockwise_attention, blockwise_bwd, blockwise_fwd
from lcjax.kernels.flash_attention import flash_attention, flash_bwd, flash_fwd
from lcjax.kernels.mask import Mask, Tokens, block_ranges
from lcjax.parallel.layout import check_layout, shard_index
from lcjax.parallel.mesh import axes_size, present_axes

f32 = jnp.float32


def _block_kernels(kernel: str):
  """(fwd, bwd, attention) for the per-block work; see the module doc."""
  if kernel == "pallas":
    interpret = jax.default_backend() == "cpu"  # no Pallas compiler there
    return (functools.partial(flash_fwd, interpret=interpret),
            functools.partial(flash_bwd, interpret=interpret),
            functools.partial(flash_attention, interpret=interpret))
  if kernel == "blockwise":
    return blockwise_fwd, blockwise_bwd, blockwise_attention
  raise ValueError(f"Unknown per-block attention kernel {kernel!r}: 'blockwise' or 'pallas'.")


def _merge(acc, out, lse):
  """Adds a block's (out `[batch, L, heads, d]`, lse `[batch, heads, L]`) to the accumulated
  (out float32, lse `[batch, L, heads, 1]`) of the blocks before."""
  return tiles.merge(*acc, out.astype(f32), jnp.swapaxes(lse, 1, 2)[..., None])


def _sees_block(mask: Mask, q_tokens: Tokens, kv_tokens: Tokens) -> jax.Array:
  """bool scalar: whether some local query may see a key of the kv block (`Mask.live`)."""
  whole = lambda t: block_ranges(t, t.index.shape[1])  # one block: the device's tokens
  return jnp.any(mask.live_pairs(whole(q_tokens), whole(kv_tokens)))


def _ring(axis_name):
  n = lax.axis_size(axis_name)
  return n, [(i, (i + 1) % n) for i in range(n)]  # device i sends to i + 1


def _ring_forward(q, k, v, q_tokens, kv_tokens, axis_name, mask, block_q, block_kv, kernel):
  """(out in q.dtype, lse float32) of the local queries over the keys of every device."""
  n, perm = _ring(axis_name)
  block_fwd = _block_kernels(kernel)[0]
  # Blockwise can hand its partial out over in float32 for the merge; the Pallas kernel's is in
  # q.dtype (one rounding per block in bfloat16).
  blocks = dict(block_q=block_q, block_kv=block_kv)
  if kernel == "blockwise":
    blocks["out_dtype"] = f32

  def add_block(acc, kv):
    k, v, kv_tokens = kv

    def attend(acc):
      return _merge(acc, *block_fwd(q, k, v, q_tokens, kv_tokens, mask=mask, **blocks))

    return lax.cond(_sees_block(mask, q_tokens, kv_tokens), attend, lambda acc: acc, acc)

  def step(carry, _):
    acc, kv = carry
    sent = lax.ppermute(kv, axis_name, perm)  # no data dependence: overlaps the compute
    return (add_block(acc, kv), sent), None

  # zeros_like/full_like keep q's varying mesh axes, which shard_map checks on loop carries.
  acc = (jnp.zeros_like(q, dtype=f32), jnp.full_like(q[..., :1], -jnp.inf, dtype=f32))
  # N - 1 steps that pass the block on, then the last block, which need not travel further.
  (acc, kv), _ = lax.scan(step, (acc, (k, v, kv_tokens)), length=n - 1)
  out, lse = add_block(acc, kv)
  return out.astype(q.dtype), jnp.swapaxes(lse[..., 0], 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _ring_attention(q, k, v, q_tokens, kv_tokens, axis_name, mask, block_q, block_kv, kernel):
  return _ring_forward(q, k, v, q_tokens, kv_tokens, axis_name, mask, block_q, block_kv,
                       kernel)[0]


def _ring_attention_fwd(q, k, v, q_tokens, kv_tokens, axis_name, mask, block_q, block_kv,
                        kernel):
  out, lse = _ring_forward(q, k, v, q_tokens, kv_tokens, axis_name, mask, block_q, block_kv,
                           kernel)
  return out, (q, k, v, q_tokens, kv_tokens, out, lse)


def _ring_attention_bwd(axis_name, mask, block_q, block_kv, kernel, residuals, dout):
  q, k, v, q_tokens, kv_tokens, out, lse = residuals
  n, perm = _ring(axis_name)
  block_bwd = _block_kernels(kernel)[1]
  blocks = dict(block_q=block_q, block_kv=block_kv)

  def add_block(dq, kv, dkv):
    k, v, kv_tokens = kv

    def grads():
      # The global out and lse: this gives the block's share of dq and its full dk, dv.
      grads = block_bwd(q, k, v, q_tokens, kv_tokens, out, lse, dout, mask=mask, **blocks)
      return tuple(g.astype(f32) for g in grads)

    def nothing():
      return jnp.zeros_like(dq), *(jnp.zeros_like(x) for x in dkv)

    dq_part, dk_part, dv_part = lax.cond(_sees_block(mask, q_tokens, kv_tokens), grads, nothing)
    return dq + dq_part, (dkv[0] + dk_part, dkv[1] + dv_part)

  def step(carry, _):
    dq, kv, dkv = carry
    sent = lax.ppermute(kv, axis_name, perm)
    dq, dkv = add_block(dq, kv, dkv)
    return (dq, sent, lax.ppermute(dkv, axis_name, perm)), None

  # dk, dv accumulate in float32 and travel with their k, v: N - 1 steps, the last block, then
  # one more hop brings every accumulator back to the device that owns its keys.
  dq = jnp.zeros_like(q, dtype=f32)
  dkv = (jnp.zeros_like(k, dtype=f32), jnp.zeros_like(v, dtype=f32))
  (dq, kv, dkv), _ = lax.scan(step, (dq, (k, v, kv_tokens), dkv), length=n - 1)
  dq, dkv = add_block(dq, kv, dkv)
  dk, dv = lax.ppermute(dkv, axis_name, perm)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def ring_attention_shard(q: jax.Array, k: jax.Array, v: jax.Array, q_tokens: Tokens,
                         kv_tokens: Tokens, *, axis_name: str, mask: Mask = Mask(),
                         block_q: int = 512, block_kv: int = 512,
                         kernel: str = "blockwise") -> jax.Array:
  """Per device, inside `shard_map`: the attention of the local queries over the keys of all
  devices on `axis_name`. q `[batch, L, heads, head_dim]`, k, v `[batch, L, kv_heads,
  head_dim]`, Tokens `[batch, L]` (index: the original order). Returns out like q.

  The backward saves only the local q, k, v, tokens, out and lse, and runs a second ring.
  """
  return _ring_attention(q, k, v, q_tokens, kv_tokens, axis_name, mask, block_q, block_kv,
                         kernel)


def allgather_attention_shard(q: jax.Array, k: jax.Array, v: jax.Array, q_tokens: Tokens,
                              kv_tokens: Tokens, *, axis_name: str, mask: Mask = Mask(),
                              block_q: int = 512, block_kv: int = 512,
                              kernel: str = "blockwise") -> jax.Array:
  """As `ring_attention_shard`, by gathering every device's k, v and kv Tokens first."""
  gather = functools.partial(lax.all_gather, axis_name=axis_name, axis=1, tiled=True)
  k, v, kv_tokens = gather(k), gather(v), jax.tree.map(gather, kv_tokens)
  attend = _block_kernels(kernel)[2]
  blocks = dict(block_q=block_q, block_kv=block_kv)
  return attend(q, k, v, q_tokens, kv_tokens, mask=mask, **blocks)[0]


METHODS = {"ring": ring_attention_shard, "allgather": allgather_attention_shard}


def sequence_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                       positions: jax.Array | None, *, mesh: Mesh, layout: str = "contiguous",
                       method: str = "ring", mask: Mask = Mask(), batch_axes=("data", "fsdp"),
                       seq_axis: str = "sequence", head_axis: str | None = "tensor",
                       block_q: int = 512, block_kv: int = 512,
                       kernel: str = "blockwise") -> jax.Array:
  """Self-attention of global arrays whose rows are split over `seq_axis` of `mesh`.

  q `[batch, seq, heads, head_dim]`, k, v `[batch, seq, kv_heads, head_dim]`, segment_ids and
  positions `[batch, seq]` int32, all already permuted into `layout` along seq (see
  `lcjax.parallel.layout.permute_batch`); positions None means one document per row. Batch is
  split over `batch_axes`, heads over `head_axis`; axes missing from the mesh are left out.
  Returns out like q, in the same permuted order. `method`: a key of `METHODS`; `kernel`: the
  per-block work, "blockwise" or "pallas".
  """
  _block_kernels(kernel)  # fails early on an unknown kernel
  if method not in METHODS:
    raise ValueError(f"Unknown sequence attention method {method!r}; choose one of "
                     f"{sorted(METHODS)}.")
  if seq_axis not in mesh.shape:
    raise ValueError(
        f"The mesh (axes {dict(mesh.shape)}) has no sequence axis {seq_axis!r}. Add it to the "
        "mesh (size 1 is fine) or pass seq_axis=<the axis that splits the sequence>.")
  batch, seq, heads, _ = q.shape
  kv_heads = k.shape[2]
  shards = mesh.shape[seq_axis]
  check_layout(layout, seq, shards)
  batch_axes, head_axis = present_axes(mesh, batch_axes), present_axes(mesh, head_axis)
  n_batch = axes_size(mesh, batch_axes)
  if batch % n_batch:
    raise ConfigError(f"Batch size {batch} is not divisible by the {n_batch} devices of the "
                      f"batch mesh axes {batch_axes}. Use a multiple of {n_batch}.")
  n_heads = axes_size(mesh, head_axis)
  if heads % n_heads or kv_heads % n_heads:
    raise ConfigError(
        f"heads={heads} and kv_heads={kv_heads} must both be divisible by the {n_heads} "
        f"devices of the head mesh axis {head_axis!r}. Change the head counts or shrink that "
        "axis (or pass head_axis=None to replicate heads).")

  def attend(q, k, v, segment_ids, positions=None):
    index = shard_index(layout, seq, shards, lax.axis_index(seq_axis))
    index = jnp.broadcast_to(index, segment_ids.shape)
    # One document per row: a token's position is its original index.
    tokens = Tokens(segment_ids, index, index if positions is None else positions)
    return METHODS[method](q, k, v, tokens, tokens, axis_name=seq_axis, mask=mask,
                           block_q=block_q, block_kv=block_kv, kernel=kernel)

  heads_spec = P(batch_axes, seq_axis, head_axis, None)
  rows = (segment_ids,) if positions is None else (segment_ids, positions)
  in_specs = (heads_spec,) * 3 + (P(batch_axes, seq_axis),) * len(rows)
  # pallas_call outputs carry no varying-axes annotation, so shard_map cannot check them.
  return jax.shard_map(attend, mesh=mesh, in_specs=in_specs, out_specs=heads_spec,
                       check_vma=kernel != "pallas")(q, k, v, *rows)
