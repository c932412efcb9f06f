"""The sbatch script `lcjax.launch slurm` writes, run as SLURM would run it on one node with two
tasks: a stand-in `srun` starts its command twice with the variables SLURM gives each task, and
the two processes (4 CPU devices each, no coordinator named) form one JAX runtime through JAX's
SLURM detection and train exactly as one process does."""

import os
import socket
import stat
import subprocess
import sys

import pytest

from lcjax.launch.common import train_command
from lcjax.launch.slurm import SlurmSettings, sbatch_script
from tests.parallel.test_multiprocess import (ACROSS, FOUR_CPUS, TINY_RUN,
                                              assert_matches_one_process)
from tests.train.runs import DEMO_GIN, REPO

# srun for one node: the command once per task, each with its SLURM_PROCID / SLURM_LOCALID and
# its own log; fails when a task fails.
FAKE_SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" > "$TASK_LOGS/task$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def job_id_with_a_free_port() -> int:
  """A SLURM_JOB_ID whose coordinator port (JAX: 61440 + id % 4096) is free here now."""
  start = os.getpid() % 4096
  for k in range(4096):
    offset = (start + k) % 4096
    with socket.socket() as s:
      try:
        s.bind(("", 61440 + offset))
      except OSError:
        continue
    return 4096 * 100 + offset
  raise AssertionError("no free port in 61440-65535")


@pytest.mark.slow
def test_the_sbatch_script_trains_two_tasks_as_one_process(tmp_path, monkeypatch):
  workdir = tmp_path / "slurm"
  command = train_command(sys.executable, [DEMO_GIN], TINY_RUN + ACROSS, str(workdir))
  script = tmp_path / "job.sbatch"
  script.write_text(sbatch_script(command, SlurmSettings(nodes=1, gpus_per_node=2)))
  bin_dir, logs = tmp_path / "bin", tmp_path / "logs"
  bin_dir.mkdir()
  logs.mkdir()
  (bin_dir / "srun").write_text(FAKE_SRUN)
  (bin_dir / "srun").chmod(stat.S_IRWXU)
  job = {"SLURM_JOB_ID": str(job_id_with_a_free_port()), "SLURM_JOB_NAME": "lcjax",
         "SLURM_NODELIST": "localhost", "SLURM_STEP_NODELIST": "localhost",
         "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_STEP_NUM_NODES": "1",
         "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_STEP_NUM_TASKS": "2",
         "SLURM_SUBMIT_DIR": REPO}
  env = {**os.environ, **FOUR_CPUS, **job, "TASK_LOGS": str(logs), "PYTHONPATH": REPO,
         "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
  done = subprocess.run(["bash", str(script)], cwd=REPO, env=env, timeout=600,
                        capture_output=True, text=True)
  tasks = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir()))
  assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{tasks}"
  assert "DistributedConfig.coordinator_address" not in script.read_text()
  assert_matches_one_process(workdir, TINY_RUN, tmp_path, monkeypatch)
