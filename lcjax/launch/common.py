"""What the launchers share: the flags that pass through to `python -m lcjax.train`, the command
they build from them, one-line errors for bad flags, and printing commands exactly."""

import argparse
import shlex
import sys
from typing import Sequence

from lcjax.errors import ConfigError

# Every process of a multi-host run calls jax.distributed.initialize(), which finds the
# coordinator, process count and id from the cluster (Cloud TPU metadata, SLURM variables).
DISTRIBUTED = "DistributedConfig.enabled = True"
# The venv `make install` creates, relative to the checkout the command runs in.
VENV_PYTHON = ".venv/bin/python"


class Parser(argparse.ArgumentParser):
  """argparse whose usage errors are one line, `Error: ...` (exit 2), like lcjax's CLIs."""

  def error(self, message):
    print(f"Error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def add_train_flags(parser: argparse.ArgumentParser) -> None:
  """The `lcjax.train` flags a launcher passes through, plus --python and --dry_run."""
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file for lcjax.train, relative to the checkout (repeatable)")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="gin binding for lcjax.train (repeatable)")
  parser.add_argument("--workdir", required=True,
                      help="lcjax.train's --workdir, as the workers see it")
  parser.add_argument("--python", default=VENV_PYTHON,
                      help="the Python that runs lcjax.train, relative to the checkout")
  parser.add_argument("--dry_run", action="store_true",
                      help="print the commands it would execute and execute nothing")


def train_command(python: str, gin_files: Sequence[str], gin_bindings: Sequence[str],
                  workdir: str) -> list[str]:
  """argv of `python -m lcjax.train` with DistributedConfig.enabled = True appended."""
  if not gin_files:
    raise ConfigError("no --gin_file: name the run's gin file(s), e.g. "
                      "--gin_file=configs/demo.gin")
  if not workdir:
    raise ConfigError("--workdir is empty: give the run directory the workers write to")
  return [python, "-m", "lcjax.train", *(f"--gin_file={f}" for f in gin_files),
          *(f"--gin_bindings={b}" for b in [*gin_bindings, DISTRIBUTED]),
          f"--workdir={workdir}"]


def command_line(argv: Sequence[str]) -> str:
  """The shell line that runs `argv` (each item quoted as the shell needs)."""
  return shlex.join(argv)


def check_positive(name: str, value: int) -> None:
  if value < 1:
    raise ConfigError(f"--{name}={value}: it must be at least 1")
