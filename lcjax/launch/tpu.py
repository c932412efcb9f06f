"""`python -m lcjax.launch tpu`: one `lcjax.train` command on every worker of a TPU VM (pod
slice), or of several slices (multi-slice), through `gcloud compute tpus tpu-vm ssh
--worker=all`.

Steps, each printed by --dry_run exactly as executed: with --code=copy, pack the tracked files
(`git ls-files`) into a tarball, scp it to every worker and unpack it in --remote_dir (with
--code=shared the checkout is already there); with --setup, `make install` on every worker with
`jax[tpu]` added; then the train command with `DistributedConfig.enabled = True` (JAX's Cloud
TPU detection finds the coordinator, process count and id). Multi-slice runs also get
MEGASCALE_COORDINATOR_ADDRESS (slice 0's worker 0, read with `gcloud ... describe`),
MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID and MEGASCALE_PORT, as MaxText's multihost runner sets
them. Each slice's output is printed with a `[slice]` prefix (each line also carries the worker's
hostname) and saved to --log_dir/<slice>.log. Ctrl-C or SIGTERM runs `pkill -f lcjax.train` on
every worker.
"""

import os
import shlex
import signal
import subprocess
import sys
import threading
from typing import Sequence

from lcjax.errors import ConfigError
from lcjax.launch import common

TARBALL = "lcjax-code.tar.gz"
MEGASCALE_PORT = 8080
# Stands for slice 0's internal IP in a dry run (the real run reads it with gcloud).
COORDINATOR_IP = "COORDINATOR_IP"
STOP = "pkill -f lcjax.train"


def slice_names(tpu: str | None, tpu_prefix: str | None, num_slices: int | None) -> list[str]:
  """The TPU VMs to run on: [tpu], or PREFIX-0 .. PREFIX-(N-1)."""
  if bool(tpu) == bool(tpu_prefix):
    raise ConfigError("give either --tpu=NAME (one slice) or --tpu_prefix=PREFIX with "
                      "--num_slices=N (slices PREFIX-0 .. PREFIX-(N-1))")
  if tpu:
    if num_slices is not None:
      raise ConfigError("--num_slices goes with --tpu_prefix, not --tpu")
    return [tpu]
  if num_slices is None:
    raise ConfigError("--tpu_prefix needs --num_slices=N (the slices PREFIX-0 .. PREFIX-(N-1))")
  common.check_positive("num_slices", num_slices)
  return [f"{tpu_prefix}-{i}" for i in range(num_slices)]


def gcloud(verb: str, zone: str, project: str, *rest: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, f"--zone={zone}",
          f"--project={project}"]


def ssh(name: str, zone: str, project: str, remote: str) -> list[str]:
  """`remote` (a shell line) on every worker of `name`."""
  return gcloud("ssh", zone, project, name, "--worker=all", f"--command={remote}")


def describe_coordinator(name: str, zone: str, project: str) -> list[str]:
  """Prints the internal IP of `name`'s worker 0."""
  return gcloud("describe", zone, project, name, "--format=value(networkEndpoints[0].ipAddress)")


def prepare_commands(names: Sequence[str], zone: str, project: str, code: str, remote_dir: str,
                     setup: bool, log_dir: str) -> list[list[str]]:
  """What runs before training: copy the code (code="copy"), install (setup)."""
  d = shlex.quote(remote_dir)
  steps = []
  if code == "copy":
    tarball = os.path.join(log_dir, TARBALL)
    steps.append(["sh", "-c", f"mkdir -p {shlex.quote(log_dir)} && git ls-files -z | "
                              f"tar -czf {shlex.quote(tarball)} --null -T -"])
    for n in names:
      steps.append(gcloud("scp", zone, project, tarball, f"{n}:{TARBALL}", "--worker=all"))
      steps.append(ssh(n, zone, project, f"mkdir -p {d} && tar -xzf {TARBALL} -C {d}"))
  if setup:
    # The Makefile's install, with the TPU build of jax resolved together with requirements.txt.
    steps += [ssh(n, zone, project, f"cd {d} && make install PIP_EXTRA='jax[tpu]'")
              for n in names]
  return steps


def run_commands(names: Sequence[str], zone: str, project: str, remote_dir: str,
                 train: Sequence[str], coordinator_ip: str | None) -> list[list[str]]:
  """The train command on every worker of every slice (one gcloud ssh per slice)."""
  out = []
  for i, n in enumerate(names):
    env = ""
    if len(names) > 1:
      env = (f"export MEGASCALE_COORDINATOR_ADDRESS={coordinator_ip}:{MEGASCALE_PORT} "
             f"MEGASCALE_NUM_SLICES={len(names)} MEGASCALE_SLICE_ID={i} "
             f"MEGASCALE_PORT={MEGASCALE_PORT} && ")
    # pipefail: the ssh exits with lcjax.train's status, not sed's.
    remote = (f"cd {shlex.quote(remote_dir)} && {env}set -o pipefail && "
              f"{common.command_line(train)} 2>&1 | sed -u \"s/^/[$(hostname)] /\"")
    out.append(ssh(n, zone, project, remote))
  return out


def stop_commands(names: Sequence[str], zone: str, project: str) -> list[list[str]]:
  return [ssh(n, zone, project, STOP) for n in names]


def add_flags(parser) -> None:
  parser.add_argument("--tpu", help="the TPU VM (one slice)")
  parser.add_argument("--tpu_prefix", help="multi-slice: the slices are PREFIX-0 .. PREFIX-(N-1)")
  parser.add_argument("--num_slices", type=int, help="multi-slice: how many slices")
  parser.add_argument("--zone", required=True, help="the TPUs' zone, e.g. us-central2-b")
  parser.add_argument("--project", required=True, help="the TPUs' Google Cloud project")
  parser.add_argument("--code", choices=("copy", "shared"), default="copy",
                      help="copy: send the tracked files to every worker; shared: the checkout "
                           "is already at --remote_dir on every worker")
  parser.add_argument("--remote_dir", default="lcjax",
                      help="the checkout on the workers (relative to the home directory)")
  parser.add_argument("--setup", action="store_true",
                      help="create the venv on every worker (make install, plus jax[tpu])")
  parser.add_argument("--log_dir", default="tpu_logs",
                      help="local directory for each slice's log (and the code tarball)")
  common.add_train_flags(parser)


def main(args) -> int:
  names = slice_names(args.tpu, args.tpu_prefix, args.num_slices)
  train = common.train_command(args.python, args.gin_file, args.gin_bindings, args.workdir)
  prepare = prepare_commands(names, args.zone, args.project, args.code, args.remote_dir,
                             args.setup, args.log_dir)
  describe = [describe_coordinator(names[0], args.zone, args.project)] if len(names) > 1 else []
  stop = stop_commands(names, args.zone, args.project)
  if args.dry_run:
    lines = [common.command_line(c) for c in prepare + describe]
    if describe:
      lines.append(f"# {COORDINATOR_IP}: the address the describe command prints")
    run = run_commands(names, args.zone, args.project, args.remote_dir, train, COORDINATOR_IP)
    lines += [common.command_line(c) for c in run]
    lines += ["# on Ctrl-C or SIGTERM:", *(common.command_line(c) for c in stop)]
    print("\n".join(lines))
    return 0
  for c in prepare:
    print(f"+ {common.command_line(c)}", flush=True)
    if (status := subprocess.run(c).returncode) != 0:
      return status
  ip = subprocess.run(describe[0], check=True, capture_output=True,
                      text=True).stdout.strip() if describe else None
  run = run_commands(names, args.zone, args.project, args.remote_dir, train, ip)
  return stream(dict(zip(names, run)), args.log_dir, stop)


def stream(commands: dict[str, list[str]], log_dir: str, stop: Sequence[Sequence[str]]) -> int:
  """Runs each slice's command; prints its lines as `[slice] line` and saves them to
  log_dir/<slice>.log. Ctrl-C or SIGTERM runs `stop` (every worker's lcjax.train ends). Returns
  the worst exit status."""
  os.makedirs(log_dir, exist_ok=True)
  procs, threads = {}, []
  previous = signal.signal(signal.SIGTERM, _interrupt)
  try:
    for name, command in commands.items():
      _say(f"+ {common.command_line(command)}\n")
      procs[name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace")
      log = os.path.join(log_dir, f"{name}.log")
      threads.append(threading.Thread(target=_tee, args=(procs[name], name, log), daemon=True))
      threads[-1].start()
    statuses = [p.wait() for p in procs.values()]
  except KeyboardInterrupt:
    print("stopping lcjax.train on every worker", file=sys.stderr, flush=True)
    for c in stop:
      print(f"+ {common.command_line(c)}", file=sys.stderr, flush=True)
      subprocess.run(c)
    for p in procs.values():
      p.terminate()
    statuses = [130]
  finally:
    signal.signal(signal.SIGTERM, previous)
  for t in threads:
    t.join(timeout=10)
  return max(statuses)


def _interrupt(signum, frame):
  raise KeyboardInterrupt


def _tee(proc: subprocess.Popen, name: str, log: str) -> None:
  with open(log, "a") as f:
    for line in proc.stdout:
      f.write(line)
      f.flush()
      _say(f"[{name}] {line}")


_SAY = threading.Lock()


def _say(text: str) -> None:
  """Writes `text` to stdout whole: the slices' threads and the main thread print at once, and
  print's separate write of the line end would let another line in before it."""
  with _SAY:
    sys.stdout.write(text)
    sys.stdout.flush()
