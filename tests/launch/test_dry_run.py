"""The launchers' dry runs print exactly the commands (or sbatch script) they would execute,
bindings with quotes survive both shells, and bad flags fail with one line."""

import shlex

import pytest

from lcjax.launch import slurm
from lcjax.launch.__main__ import main

TRAIN = ["--gin_file=configs/demo.gin", "--gin_bindings=MeshConfig.fsdp = 4",
         "--workdir=gs://b/run", "--dry_run"]
RUN = ("--command=cd lcjax && {env}set -o pipefail && .venv/bin/python -m lcjax.train "
       "--gin_file=configs/demo.gin '--gin_bindings=MeshConfig.fsdp = 4' "
       "'--gin_bindings=DistributedConfig.enabled = True' --workdir=gs://b/run "
       "2>&1 | sed -u \"s/^/[$(hostname)] /\"")
ZP = ["--zone=z", "--project=p"]


def dry_run(capsys, argv) -> list[str]:
  assert main(argv) == 0
  return capsys.readouterr().out.splitlines()


def ssh(name, command):
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, "--worker=all", command, *ZP]


def test_tpu_single_slice_copy(capsys):
  lines = dry_run(capsys, ["tpu", "--tpu=t", *ZP, *TRAIN])
  assert [shlex.split(x) for x in lines] == [
      ["sh", "-c", "mkdir -p tpu_logs && git ls-files -z | "
                   "tar -czf tpu_logs/lcjax-code.tar.gz --null -T -"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", "tpu_logs/lcjax-code.tar.gz",
       "t:lcjax-code.tar.gz", "--worker=all", *ZP],
      ssh("t", "--command=mkdir -p lcjax && tar -xzf lcjax-code.tar.gz -C lcjax"),
      ssh("t", RUN.format(env="")),
      ["#", "on", "Ctrl-C", "or", "SIGTERM:"],
      ssh("t", "--command=pkill -f lcjax.train"),
  ]


def test_tpu_two_slices_shared_code_with_setup(capsys):
  lines = dry_run(capsys, ["tpu", "--tpu_prefix=v", "--num_slices=2", *ZP, "--code=shared",
                           "--remote_dir=src/lc", "--setup", *TRAIN])
  run = RUN.replace("cd lcjax", "cd src/lc")
  env = ("export MEGASCALE_COORDINATOR_ADDRESS=COORDINATOR_IP:8080 MEGASCALE_NUM_SLICES=2 "
         "MEGASCALE_SLICE_ID={} MEGASCALE_PORT=8080 && ")
  assert [shlex.split(x) for x in lines] == [
      ssh("v-0", "--command=cd src/lc && make install PIP_EXTRA='jax[tpu]'"),
      ssh("v-1", "--command=cd src/lc && make install PIP_EXTRA='jax[tpu]'"),
      ["gcloud", "compute", "tpus", "tpu-vm", "describe", "v-0",
       "--format=value(networkEndpoints[0].ipAddress)", *ZP],
      ["#", "COORDINATOR_IP:", "the", "address", "the", "describe", "command", "prints"],
      ssh("v-0", run.format(env=env.format(0))),
      ssh("v-1", run.format(env=env.format(1))),
      ["#", "on", "Ctrl-C", "or", "SIGTERM:"],
      ssh("v-0", "--command=pkill -f lcjax.train"),
      ssh("v-1", "--command=pkill -f lcjax.train"),
  ]


def test_tpu_bindings_with_quotes_survive_both_shells(capsys):
  binding = """TrainConfig.name = "it's a \\"run\\"" """
  lines = dry_run(capsys, ["tpu", "--tpu=t", *ZP, "--code=shared", f"--gin_bindings={binding}",
                           *TRAIN])
  local = shlex.split(lines[0])  # the shell you paste it into
  remote = shlex.split(local[local.index("--worker=all") + 1].removeprefix("--command="))
  assert f"--gin_bindings={binding}" in remote  # the worker's shell


SLURM_HEAD = """\
#!/bin/bash
#SBATCH --job-name=lcjax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
"""
SLURM_TAIL = """\
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
{array}
# Before the time limit: stop the tasks as preemption does (SIGTERM: each saves a
# checkpoint and exits 0), then requeue; the requeued job resumes from --workdir.
requeue() {{
  kill -TERM "$srun_pid"
  wait "$srun_pid"
  scontrol requeue "$SLURM_JOB_ID"
}}
trap requeue USR1
srun --kill-on-bad-exit=1 {command} &
srun_pid=$!
wait "$srun_pid"
"""


def test_slurm_two_nodes_of_eight_gpus(capsys):
  lines = dry_run(capsys, ["slurm", "--nodes=2", "--gpus_per_node=8", "--partition=gpu",
                           "--account=lm", "--time=1-00:00:00", "--out=jobs/a.sbatch", *TRAIN])
  command = (".venv/bin/python -m lcjax.train --gin_file=configs/demo.gin "
             "'--gin_bindings=MeshConfig.fsdp = 4' "
             "'--gin_bindings=DistributedConfig.enabled = True' --workdir=gs://b/run")
  script = (SLURM_HEAD + "#SBATCH --partition=gpu\n#SBATCH --account=lm\n"
            "#SBATCH --time=1-00:00:00\n#SBATCH --output=%x-%j.out\n"
            + SLURM_TAIL.format(array="", command=command))
  assert "\n".join(lines) == f"# jobs/a.sbatch\n{script}\n# submit:\nsbatch jobs/a.sbatch"


def test_slurm_array_keeps_the_task_id_a_variable():
  command = ["python", "run.py", "--cell=$SLURM_ARRAY_TASK_ID", "it's",
             "--dir=a b/$SLURM_ARRAY_TASK_ID/x", "$SLURM_ARRAY_TASK_ID"]
  script = slurm.sbatch_script(command, slurm.SlurmSettings(nodes=2, gpus_per_node=8),
                               array_size=4)
  quoted = ("python run.py --cell=\"$SLURM_ARRAY_TASK_ID\" 'it'\"'\"'s' "
            "'--dir=a b/'\"$SLURM_ARRAY_TASK_ID\"/x \"$SLURM_ARRAY_TASK_ID\"")
  assert script == (SLURM_HEAD + "#SBATCH --output=%x-%A_%a.out\n"
                    + SLURM_TAIL.format(array="#SBATCH --array=0-3\n", command=quoted))


def test_slurm_writes_the_script_without_dry_run(tmp_path, capsys):
  out = tmp_path / "jobs" / "x.sbatch"
  assert main(["slurm", "--nodes=1", f"--out={out}", *TRAIN[:-1]]) == 0
  assert out.read_text().startswith("#!/bin/bash\n#SBATCH --job-name=lcjax\n#SBATCH --nodes=1\n")
  assert f"sbatch {out}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["tpu", "--tpu=t", "--project=p", *TRAIN],
     "Error: the following arguments are required: --zone (see --help)"),
    (["tpu", *ZP, *TRAIN], "Error: give either --tpu=NAME"),
    (["tpu", "--tpu=t", "--tpu_prefix=v", *ZP, *TRAIN], "Error: give either --tpu=NAME"),
    (["tpu", "--tpu_prefix=v", *ZP, *TRAIN], "Error: --tpu_prefix needs --num_slices=N"),
    (["tpu", "--tpu_prefix=v", "--num_slices=0", *ZP, *TRAIN],
     "Error: --num_slices=0: it must be at least 1"),
    (["tpu", "--tpu=t", "--code=rsync", *ZP, *TRAIN], "Error: argument --code: invalid choice"),
    (["slurm", "--nodes=0", *TRAIN], "Error: --nodes=0: it must be at least 1"),
    (["slurm", "--gpus_per_node=-1", *TRAIN], "Error: --gpus_per_node=-1: it must be at least 1"),
    (["slurm", "--time=4h", *TRAIN], "Error: --time='4h': give sbatch's format"),
    (["slurm", "--job_name=a b", *TRAIN], "Error: --job_name='a b': use letters"),
    (["slurm", "--workdir=x", "--dry_run"], "Error: no --gin_file"),
    (["slurm", *TRAIN[:2], "--dry_run"],
     "Error: the following arguments are required: --workdir (see --help)"),
    (["cluster"], "Error: argument target: invalid choice"),
])
def test_bad_flags_fail_with_one_line(capsys, argv, message):
  try:
    status = main(argv)
  except SystemExit as e:  # argparse's errors
    status = e.code
  assert status == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err
