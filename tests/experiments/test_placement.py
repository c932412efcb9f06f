"""Each concurrent cell's share of the host: the exact environment per backend and slot."""

import pytest

from lcjax.errors import ConfigError
from lcjax.sweep.placement import placement, share


def test_share_splits_devices_into_contiguous_groups():
  assert [share(8, 4, s) for s in range(4)] == [(0, 1), (2, 3), (4, 5), (6, 7)]
  assert [share(3, 2, s) for s in range(2)] == [(0,), (1,)]  # the odd one out stays idle
  with pytest.raises(ConfigError, match="--parallel=3 is more than the 2 devices"):
    share(2, 3, 0)
  with pytest.raises(ConfigError, match="--parallel=0"):
    share(2, 0, 0)


def test_cpu_one_core_each():
  p = placement("cpu", 2, 2, 1, xla_flags="--xla_dump_to=/tmp/x")
  assert p.devices == (1,) and p.cpus == (1,)
  assert p.env == {"OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1",
                   "TF_NUM_INTEROP_THREADS": "1",
                   "XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_cpu_multi_thread_eigen=false"}


def test_cpu_several_cores_each():
  p = placement("cpu", 16, 2, 1)
  assert p.cpus == tuple(range(8, 16))
  assert p.env == {"OMP_NUM_THREADS": "8", "TF_NUM_INTRAOP_THREADS": "8",
                   "TF_NUM_INTEROP_THREADS": "8"}


def test_gpu():
  assert placement("gpu", 8, 4, 2).env == {"CUDA_VISIBLE_DEVICES": "4,5"}
  assert placement("gpu", 8, 4, 2).cpus is None
  assert placement("gpu", 8, 1, 0).env == {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}


def test_tpu_one_process_per_chip_group():
  assert placement("tpu", 4, 4, 3).env == {
      "TPU_VISIBLE_CHIPS": "3", "TPU_VISIBLE_DEVICES": "3",
      "TPU_CHIPS_PER_PROCESS_BOUNDS": "1,1,1", "TPU_PROCESS_BOUNDS": "1,1,1",
      "TPU_MESH_CONTROLLER_ADDRESS": "localhost:8479", "TPU_MESH_CONTROLLER_PORT": "8479"}
  assert placement("tpu", 4, 2, 1).env == {
      "TPU_VISIBLE_CHIPS": "2,3", "TPU_VISIBLE_DEVICES": "2,3",
      "TPU_CHIPS_PER_PROCESS_BOUNDS": "1,2,1", "TPU_PROCESS_BOUNDS": "1,1,1",
      "TPU_MESH_CONTROLLER_ADDRESS": "localhost:8477", "TPU_MESH_CONTROLLER_PORT": "8477"}
  assert placement("tpu", 8, 2, 0).env["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "2,2,1"


def test_bad_backend_or_tpu_group():
  with pytest.raises(ConfigError, match="Unknown backend 'npu'"):
    placement("npu", 2, 1, 0)
  with pytest.raises(ConfigError, match="3 TPU chips per cell"):
    placement("tpu", 6, 2, 0)
