"""The device mesh: named axes `data`, `fsdp`, `tensor`, `sequence`, sizes from gin."""

import dataclasses
import math

import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from lcjax.errors import ConfigError

AXES = ("data", "fsdp", "tensor", "sequence")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Axis sizes; exactly one may be -1, meaning "all remaining devices"."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  sequence: int = 1

  def shape(self, num_devices: int) -> dict[str, int]:
    """Resolves -1 and checks that the axes use every device exactly once."""
    sizes = {axis: getattr(self, axis) for axis in AXES}
    bad = {a: s for a, s in sizes.items() if not isinstance(s, int) or (s < 1 and s != -1)}
    if bad:
      raise ConfigError(f"MeshConfig: axis sizes must be positive integers or -1, got {bad}.")
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
      raise ConfigError(
          f"MeshConfig: only one axis may be -1 (the rest of the devices), got {free}. "
          "Set all but one of them explicitly.")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
      if num_devices % fixed:
        raise ConfigError(
            f"MeshConfig {sizes}: the fixed axes use {fixed} devices, which does not divide the "
            f"{num_devices} available, so '{free[0]}=-1' cannot take the rest. Choose sizes whose "
            f"product divides {num_devices}.")
      sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
      raise ConfigError(
          f"MeshConfig {sizes}: the axes multiply to {fixed} devices but {num_devices} are "
          "available. Make the product equal the device count, or set one axis to -1.")
    return sizes


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  """A Mesh over `devices` (default: all), laid out for the physical topology."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = cfg.shape(len(devices))
  shape = tuple(sizes[a] for a in AXES)
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    # No topology-aware layout for this shape (e.g. CPU or odd slices): plain order is correct.
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, AXES)


# -- Mesh axes named in a PartitionSpec entry (None, one name, or a tuple of names) -------------


def axis_names(entry) -> tuple[str, ...]:
  """A PartitionSpec entry -> a tuple of mesh axis names."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def present_axes(mesh: Mesh, entry):
  """The entry with only the axes `mesh` has: None, one name, or a tuple of names."""
  names = tuple(a for a in axis_names(entry) if a in mesh.shape)
  if not names:
    return None
  return names[0] if len(names) == 1 else names


def axes_size(mesh: Mesh, entry) -> int:
  """How many devices the axes of `entry` span together (1 for None)."""
  return math.prod(mesh.shape[a] for a in axis_names(entry))
