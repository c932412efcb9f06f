"""Two processes on this machine (loopback coordinator, 4 CPU devices each) train one model on
a mesh that spans both, with the sequence axis across them, and match one process."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.parallel.test_sequence_model import HYBRID
from tests.train.runs import DEMO_GIN, REPO, bindings, train_in_process, train_losses

STEPS = 3


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# The tiny model, 3 steps (a hybrid here; tests/launch/test_slurm_emulation.py uses TINY's own).
# Process 0 holds devices 0-3 and process 1 devices 4-7: the 8-way sequence ring crosses them,
# so both processes load the same rows and each feeds its half of every row.
TINY_RUN = bindings(TrainConfig__steps=STEPS, TrainConfig__eval_every=STEPS,
                    TrainConfig__checkpoint_every=STEPS)
COMMON = TINY_RUN + HYBRID
ACROSS = ["MeshConfig.data = 1", "MeshConfig.sequence = 8", "SequenceConfig.layout = 'zigzag'"]
# Each process: 4 fake CPU devices.
FOUR_CPUS = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}


def assert_matches_one_process(workdir, common, tmp_path, monkeypatch) -> None:
  """The two-process run in `workdir` (`common` + ACROSS) logged the losses one process on one
  device logs, and its checkpoint holds both processes' data-iterator states."""
  devices = jax.devices()
  monkeypatch.setattr("lcjax.parallel.mesh.jax.devices", lambda: devices[:1])
  one = train_in_process(tmp_path / "one", common + ["MeshConfig.data = 1"])
  got, want = train_losses(workdir), train_losses(tmp_path / "one")
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)],
                             [want[s] for s in range(1, STEPS + 1)], rtol=2e-5)
  # The checkpoint holds both processes' data-iterator states (written collectively).
  data_files = list((workdir / "checkpoints" / str(STEPS) / "data").iterdir())
  saved = "".join(f.read_text() for f in data_files if f.is_file())
  assert "iterator_0" in saved and "iterator_1" in saved, data_files
  assert one["step"] == STEPS


@pytest.mark.slow
def test_two_processes_with_the_sequence_axis_across_them(tmp_path, monkeypatch):
  port = free_port()
  workdir = tmp_path / "two"
  env = {**os.environ, **FOUR_CPUS}
  procs = []
  for pid in range(2):
    dist = ["DistributedConfig.enabled = True",
            f"DistributedConfig.coordinator_address = '127.0.0.1:{port}'",
            "DistributedConfig.num_processes = 2", f"DistributedConfig.process_id = {pid}"]
    cmd = [sys.executable, "-m", "lcjax.train", f"--gin_file={DEMO_GIN}", f"--workdir={workdir}"]
    cmd += [f"--gin_bindings={b}" for b in COMMON + ACROSS + dist]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for pid, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {pid} failed:\n{out[-4000:]}"
  assert_matches_one_process(workdir, COMMON, tmp_path, monkeypatch)
