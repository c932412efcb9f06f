"""Sequence layouts: which tokens of a row each device of the `sequence` mesh axis holds.

With causal attention and the row split into contiguous shards, the last shard attends to
everything and the first to almost nothing. Two load-balanced layouts fix that:

    contiguous   shard d holds tokens [d*L, (d+1)*L)              (L = seq / shards)
    zigzag       split the row into 2N chunks; shard d holds chunks d and 2N-1-d
    striped      shard d holds tokens d, d+N, d+2N, ...

A layout is applied once, by permuting every `[batch, seq]` array of a batch along the
sequence (`permute_batch`) before the model; sharding the permuted row contiguously then gives
each device its tokens. The loss is a sum over tokens, so it does not change. The mask keeps
the original order through `Tokens.index` (`lcjax.kernels.attention`), which `shard_index`
recomputes inside `shard_map` from the device's place on the axis.
"""

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.errors import ConfigError

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(layout: str, seq: int, shards: int) -> None:
  """Fails, naming the fix, if `layout` is unknown or cannot split `seq` over `shards`."""
  if layout not in LAYOUTS:
    raise ConfigError(f"Unknown sequence layout {layout!r}; choose one of {LAYOUTS}.")
  unit = 2 * shards if layout == "zigzag" else shards
  if seq % unit:
    raise ConfigError(
        f"Sequence length {seq} cannot be split in the {layout!r} layout over {shards} "
        f"sequence shards: it must be a multiple of {unit}"
        f"{' (2 chunks per shard)' if layout == 'zigzag' else ''}. Change the sequence length "
        f"or the sequence mesh axis.")


def shard_index(layout: str, seq: int, shards: int, shard, xp=jnp) -> jax.Array:
  """int32 `[seq // shards]`: the original indices of the tokens shard `shard` holds, in the
  order it holds them. `shard` may be traced (`lax.axis_index` inside `shard_map`); pass
  xp=np for a host array."""
  local = seq // shards
  arange = lambda n: xp.arange(n, dtype=xp.int32)
  if layout == "contiguous":
    return shard * local + arange(local)
  if layout == "zigzag":
    half = local // 2
    first = shard * half + arange(half)
    second = (2 * shards - 1 - shard) * half + arange(half)
    return xp.concatenate([first, second])
  if layout == "striped":
    return shard + shards * arange(local)
  raise ValueError(f"Unknown sequence layout {layout!r}; choose one of {LAYOUTS}.")


def permutation(layout: str, seq: int, shards: int) -> np.ndarray:
  """int32 `[seq]`: perm[p] is the original index of the token at permuted position p (a host
  array: usable while tracing)."""
  check_layout(layout, seq, shards)
  return np.concatenate([shard_index(layout, seq, shards, d, xp=np) for d in range(shards)])


def permute_batch(batch: dict, layout: str, shards: int) -> dict:
  """Every `[batch, seq]` array of `batch`, reordered along the sequence into `layout`."""
  if layout == "contiguous" or shards == 1:
    return batch
  seq = next(iter(batch.values())).shape[1]
  perm = permutation(layout, seq, shards)
  return {name: x[:, perm] for name, x in batch.items()}


def unpermute(x, layout: str, shards: int, axis: int = 1):
  """The inverse of the layout's permutation along `axis`: back to the original order."""
  if layout == "contiguous" or shards == 1:
    return x
  inverse = np.argsort(permutation(layout, x.shape[axis], shards))
  return jnp.take(x, inverse, axis=axis) if isinstance(x, jax.Array) else np.take(
      x, inverse, axis=axis)
