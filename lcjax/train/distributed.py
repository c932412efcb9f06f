"""Multi-host start-up: `jax.distributed.initialize` when configured."""

import dataclasses

import gin
import jax

from lcjax.config import check_types


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """`enabled` on TPU pods / SLURM lets JAX detect everything; otherwise name the coordinator."""
  enabled: bool = False
  coordinator_address: str | None = None  # "host:port" of process 0
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  def __post_init__(self):
    check_types(self)  # a wrong-typed gin binding fails here, naming it


def maybe_initialize(cfg: DistributedConfig | None = None) -> None:
  cfg = cfg or DistributedConfig()
  if not cfg.enabled:
    return
  jax.distributed.initialize(
      coordinator_address=cfg.coordinator_address,
      num_processes=cfg.num_processes,
      process_id=cfg.process_id,
      local_device_ids=list(cfg.local_device_ids) if cfg.local_device_ids else None,
  )
