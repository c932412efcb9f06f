"""`python -m lcjax.launch slurm`: an sbatch script that runs one `lcjax.train` command on
SLURM GPU nodes, written to --out and, with --submit, submitted.

One task per GPU (`--ntasks-per-node` = `--gpus-per-node`). Each task calls
`jax.distributed.initialize()` with nothing set; JAX's SLURM detection reads SLURM_JOB_ID (the
coordinator port: 61440 + job id % 4096), SLURM_STEP_NODELIST (its first node is the
coordinator), SLURM_NTASKS (process count), SLURM_PROCID (process id) and SLURM_LOCALID, and
sets `local_device_ids = [SLURM_LOCALID]`: task i of a node sees only that node's GPU i. So
every process drives one GPU, and the mesh sees nodes x GPUs devices, one per process. One task
per node would also get `local_device_ids = [0]` and see a single GPU: JAX's detection assumes
one task per GPU.

Preemption and the time limit: SLURM sends SIGTERM to every task when it preempts the job;
`lcjax.train` saves a checkpoint and exits 0, and SLURM requeues the job (`--requeue`). Before
the time limit (`--signal=B:USR1@...`) the script itself gets USR1: it sends SIGTERM to the
tasks (through srun), waits for their checkpoint and requeues the job with `scontrol requeue`.
A requeued job runs the same script, hence the same command and --workdir, and resumes from the
newest checkpoint there; its log is appended to (`--open-mode=append`).

`sbatch_script` is also what sweeps use for job arrays (one cell per SLURM_ARRAY_TASK_ID).
"""

import dataclasses
import os
import re
import shlex
import subprocess
from typing import Sequence

from lcjax.errors import ConfigError
from lcjax.launch import common

ARRAY_TASK_ID = "$SLURM_ARRAY_TASK_ID"
# What the time-limit warning leaves for the checkpoint: SIGTERM to exit, in seconds.
GRACE_S = 300
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # sbatch's minutes, [D-]HH:MM[:SS], ...
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclasses.dataclass(frozen=True)
class SlurmSettings:
  """The sbatch options of a job; None leaves the cluster's default."""
  nodes: int = 1
  gpus_per_node: int = 8
  partition: str | None = None
  account: str | None = None
  time: str | None = None  # sbatch --time: "HH:MM:SS", "D-HH:MM:SS", minutes
  job_name: str = "lcjax"
  # Tasks (processes) per node: one per GPU (None) for a distributed run; 1 for a command that
  # drives all of its node's GPUs from one process (a sweep cell).
  tasks_per_node: int | None = None

  def __post_init__(self):
    common.check_positive("nodes", self.nodes)
    common.check_positive("gpus_per_node", self.gpus_per_node)
    if self.tasks_per_node is not None:
      common.check_positive("tasks_per_node", self.tasks_per_node)
    if not _NAME.match(self.job_name):
      raise ConfigError(f"--job_name={self.job_name!r}: use letters, digits, '.', '_', '-'")
    if self.time is not None and not _TIME.match(self.time):
      raise ConfigError(f"--time={self.time!r}: give sbatch's format, e.g. 04:00:00 or "
                        "1-12:00:00")


def quote(item: str) -> str:
  """`item` quoted for bash, except that $SLURM_ARRAY_TASK_ID in it stays a variable."""
  pieces = item.split(ARRAY_TASK_ID)
  return f'"{ARRAY_TASK_ID}"'.join(shlex.quote(p) if p else "" for p in pieces) or "''"


def srun_line(command: Sequence[str]) -> str:
  """The script's srun line: `command` on every task; one task's failure ends them all."""
  return "srun --kill-on-bad-exit=1 " + " ".join(map(quote, command))


def sbatch_script(command: list[str], settings: SlurmSettings,
                  array_size: int | None = None) -> str:
  """The sbatch script that runs `command` (argv) under srun (one task per GPU unless
  `settings.tasks_per_node` says otherwise), requeued on preemption and before the time limit;
  `array_size=N` makes it a job array 0..N-1."""
  s = settings
  log = "%x-%A_%a.out" if array_size is not None else "%x-%j.out"
  options = [f"--job-name={s.job_name}", f"--nodes={s.nodes}",
             f"--ntasks-per-node={s.tasks_per_node or s.gpus_per_node}",
             f"--gpus-per-node={s.gpus_per_node}"]
  options += [f"--{k}={v}" for k, v in
              (("partition", s.partition), ("account", s.account), ("time", s.time)) if v]
  options += [f"--output={log}", "--open-mode=append", "--requeue",
              f"--signal=B:USR1@{GRACE_S}"]
  if array_size is not None:
    common.check_positive("array_size", array_size)
    options.append(f"--array=0-{array_size - 1}")
  lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in options), "",
           "# Before the time limit: stop the tasks as preemption does (SIGTERM: each saves a",
           "# checkpoint and exits 0), then requeue; the requeued job resumes from --workdir.",
           "requeue() {",
           '  kill -TERM "$srun_pid"',
           '  wait "$srun_pid"',
           '  scontrol requeue "$SLURM_JOB_ID"',
           "}",
           "trap requeue USR1",
           srun_line(command) + " &",
           "srun_pid=$!",
           'wait "$srun_pid"', ""]
  return "\n".join(lines)


def add_flags(parser) -> None:
  parser.add_argument("--nodes", type=int, default=1, help="nodes to run on")
  parser.add_argument("--gpus_per_node", type=int, default=8,
                      help="GPUs per node: one task (one JAX process) per GPU")
  parser.add_argument("--partition", help="sbatch --partition (default: the cluster's)")
  parser.add_argument("--account", help="sbatch --account (default: the cluster's)")
  parser.add_argument("--time", help="sbatch --time, e.g. 04:00:00 (default: the partition's)")
  parser.add_argument("--job_name", default="lcjax", help="sbatch --job-name; logs %%x-%%j.out")
  parser.add_argument("--out", default=None,
                      help="where to write the script (default: JOB_NAME.sbatch)")
  parser.add_argument("--submit", action="store_true", help="run sbatch on the script")
  common.add_train_flags(parser)


def main(args) -> int:
  settings = SlurmSettings(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                           partition=args.partition, account=args.account, time=args.time,
                           job_name=args.job_name)
  command = common.train_command(args.python, args.gin_file, args.gin_bindings, args.workdir)
  script = sbatch_script(command, settings)
  out = args.out or f"{settings.job_name}.sbatch"
  submit = ["sbatch", out]
  if args.dry_run:
    print(f"# {out}\n{script}\n# submit:\n{common.command_line(submit)}")
    return 0
  if os.path.dirname(out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    f.write(script)
  if not args.submit:
    print(f"wrote {out}; submit it from this checkout with: {common.command_line(submit)}")
    return 0
  return subprocess.run(submit).returncode
