"""Logical axis names -> mesh axes.

Every parameter carries `logical_axes` metadata (one name per dimension, set where it is
created in `lcjax.models`); activations and batches use the names below too. A rule list maps
each logical name to a mesh axis (or a tuple of them, or None for replicated), as in t5x and
MaxText. Changing the parallelism strategy means changing the rules, never the model.
"""

import gin
import jax
from flax import linen as nn
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcjax.errors import ConfigError
from lcjax.parallel.mesh import axes_size

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("seq", "sequence"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    # Mamba-2: heads and their channels split over tensor like attention heads; B and C are
    # shared by the heads of a group and small, so they stay whole.
    ("ssm_inner", "tensor"),
    ("ssm_heads", "tensor"),
    ("ssm_bc", None),
    ("conv", None),
)

BATCH_AXES = ("batch", "seq")


@gin.configurable
def logical_rules(rules=DEFAULT_RULES) -> tuple:
  """The active rules (gin: `logical_rules.rules = ((name, mesh_axes), ...)`)."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def spec(logical_axes, rules) -> PartitionSpec:
  return nn.logical_to_mesh_axes(logical_axes, rules)


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules):
  """NamedShardings (as a pure dict matching `nnx.to_pure_dict`) for every parameter.

  Fails if a dimension does not divide its mesh axes, naming the parameter and the fix.
  """

  def one(path, var):
    axes = var.get_metadata().get("logical_axes")
    if axes is None or len(axes) != len(var.value.shape):
      raise ValueError(
          f"Parameter {jax.tree_util.keystr(path)} has logical_axes={axes} for shape "
          f"{var.value.shape}: every nnx.Param needs one logical axis name per dimension.")
    pspec = spec(axes, rules)
    for dim, (size, mesh_axes) in enumerate(zip(var.value.shape, pspec)):
      n = axes_size(mesh, mesh_axes)
      if size % n:
        raise ConfigError(
            f"Parameter {jax.tree_util.keystr(path)} (shape {var.value.shape}, logical axes "
            f"{axes}) cannot be sharded: dimension {dim} ('{axes[dim]}', size {size}) is not "
            f"divisible by mesh axes {mesh_axes} of size {n}. Change the mesh, the model size, "
            f"or map '{axes[dim]}' to another axis in logical_rules.rules.")
    return NamedSharding(mesh, pspec)

  shardings = jax.tree_util.tree_map_with_path(
      one, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings)


def describe(abstract_params: nnx.State, mesh: Mesh, rules) -> str:
  """The mesh, the rules, and each kind of parameter (block numbers folded) with its logical
  axes, global shape and per-device shape: printed at the start of a run."""
  lines = [f"mesh {dict(mesh.shape)}", "logical axis rules:"]
  lines += [f"  {name:>10} -> {axes}" for name, axes in rules]
  lines.append("parameters (kind: logical axes, global shape -> per-device shape):")
  kinds = {}
  for path, var in jax.tree_util.tree_leaves_with_path(
      abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    kind = ".".join("*" if isinstance(getattr(k, "key", k), int) else str(getattr(k, "key", k))
                    for k in path)
    axes = var.get_metadata().get("logical_axes")
    local = tuple(size // axes_size(mesh, mesh_axes)
                  for size, mesh_axes in zip(var.value.shape, spec(axes, rules)))
    kinds.setdefault(kind, f"  {kind}: {axes}, {tuple(var.value.shape)} -> {local}")
  return "\n".join(lines + sorted(kinds.values()))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of `[batch, seq]` arrays."""
  return NamedSharding(mesh, spec(BATCH_AXES, rules))


def process_share(batch_sharding: NamedSharding, global_shape: tuple[int, int]):
  """The part of a `[batch, seq]` array this process's devices hold: (rows, positions) slices,
  and which of the equal row ranges that is (index, count) — processes that hold the same rows
  (the sequence split across them) must load the same data.
  """
  spans = batch_sharding.addressable_devices_indices_map(global_shape).values()

  def union(dim):
    starts = [s[dim].start or 0 for s in spans]
    stops = [global_shape[dim] if s[dim].stop is None else s[dim].stop for s in spans]
    return slice(min(starts), max(stops))

  rows, positions = union(0), union(1)
  n_rows = rows.stop - rows.start
  return rows, positions, rows.start // n_rows, global_shape[0] // n_rows


def check_batch(global_batch_size: int, seq_len: int, mesh: Mesh, rules) -> None:
  """Fails fast when the batch or the sequence cannot be split over the mesh."""
  b_axes, s_axes = spec(BATCH_AXES, rules)
  nb, ns = axes_size(mesh, b_axes), axes_size(mesh, s_axes)
  if global_batch_size % nb:
    raise ConfigError(
        f"Global batch size {global_batch_size} is not divisible by the {nb} devices of the "
        f"batch mesh axes {b_axes} (mesh {dict(mesh.shape)}). Use a batch size that is a "
        f"multiple of {nb}, or shrink those mesh axes.")
  if seq_len % ns:
    raise ConfigError(
        f"Sequence length {seq_len} is not divisible by the {ns} devices of the sequence mesh "
        f"axes {s_axes}. Use a multiple of {ns}.")
