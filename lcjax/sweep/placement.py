"""Each concurrent cell's share of the host, as the environment its process starts with.

The host's devices (CPU cores, GPUs or TPU chips) are split into `parallel` equal contiguous
groups; slot `s` gets group `s` (devices beyond parallel * share stay idle):
  cpu: the cores (the runner pins the process to them with sched_setaffinity) and thread counts
       to match, for XLA's CPU client and for TensorFlow (the data pipeline);
  gpu: CUDA_VISIBLE_DEVICES;
  tpu: TPU_VISIBLE_CHIPS and the TPU_* bounds of one process per chip group, each with its own
       mesh-controller port (libtpu's way to run independent processes on one TPU VM).
Pure functions: the runner applies what they return.
"""

import dataclasses

from lcjax.errors import ConfigError

BACKENDS = ("cpu", "gpu", "tpu")
TPU_PORT = 8476  # libtpu's default mesh-controller port; slot s uses TPU_PORT + s
# Chips per process -> TPU_CHIPS_PER_PROCESS_BOUNDS (x,y,z): the chip groups of a TPU VM host.
TPU_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}


@dataclasses.dataclass(frozen=True)
class Placement:
  devices: tuple[int, ...]  # the slot's cores, GPUs or chips
  env: dict  # variables to set in the cell's process (on top of the inherited ones)
  cpus: tuple[int, ...] | None  # cores to pin the process to (cpu only)


def share(num_devices: int, parallel: int, slot: int) -> tuple[int, ...]:
  """The device indices of `slot`: its contiguous group of num_devices // parallel."""
  if parallel < 1 or not 0 <= slot < parallel:
    raise ConfigError(f"--parallel={parallel} (slot {slot}): give --parallel >= 1.")
  if parallel > num_devices:
    raise ConfigError(f"--parallel={parallel} is more than the {num_devices} devices here: each "
                      f"cell needs at least one; use --parallel={num_devices} or fewer.")
  size = num_devices // parallel
  return tuple(range(slot * size, (slot + 1) * size))


def placement(backend: str, num_devices: int, parallel: int, slot: int,
              xla_flags: str = "") -> Placement:
  """Where slot `slot` of `parallel` runs on a host of `num_devices` `backend` devices;
  `xla_flags`: the inherited XLA_FLAGS, kept (a thread flag is added on cpu)."""
  if backend not in BACKENDS:
    raise ConfigError(f"Unknown backend {backend!r}: one of {', '.join(BACKENDS)}.")
  devices = share(num_devices, parallel, slot)
  listed = ",".join(map(str, devices))
  if backend == "gpu":
    return Placement(devices, {"CUDA_VISIBLE_DEVICES": listed}, None)
  if backend == "tpu":
    return Placement(devices, _tpu_env(devices, slot), None)
  threads = str(len(devices))
  env = {"OMP_NUM_THREADS": threads, "TF_NUM_INTRAOP_THREADS": threads,
         "TF_NUM_INTEROP_THREADS": threads}
  if len(devices) == 1:  # XLA's CPU client otherwise starts an Eigen pool per visible core
    env["XLA_FLAGS"] = f"{xla_flags} --xla_cpu_multi_thread_eigen=false".strip()
  return Placement(devices, env, devices)


def _tpu_env(chips: tuple[int, ...], slot: int) -> dict:
  if len(chips) not in TPU_BOUNDS:
    raise ConfigError(f"{len(chips)} TPU chips per cell: a TPU VM host splits into groups of "
                      f"{', '.join(map(str, TPU_BOUNDS))} chips; choose --parallel to match.")
  listed, port = ",".join(map(str, chips)), TPU_PORT + slot
  return {"TPU_VISIBLE_CHIPS": listed, "TPU_VISIBLE_DEVICES": listed,  # (older libtpu's name)
          "TPU_CHIPS_PER_PROCESS_BOUNDS": TPU_BOUNDS[len(chips)], "TPU_PROCESS_BOUNDS": "1,1,1",
          "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{port}",
          "TPU_MESH_CONTROLLER_PORT": str(port)}


def host_devices(backend: str) -> int:
  """How many `backend` devices this host has, without starting JAX (cpu: the cores this
  process may use; gpu: nvidia-smi's count; tpu: /dev/accel* or /dev/vfio chips)."""
  import glob
  import os
  import subprocess

  if backend == "cpu":
    return len(os.sched_getaffinity(0))
  if backend == "gpu":
    out = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True)
    return len([line for line in out.stdout.splitlines() if line.strip()])
  return len(glob.glob("/dev/accel*")) or len(glob.glob("/dev/vfio/[0-9]*"))
