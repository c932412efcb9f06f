"""The CLIs import every configurable's module before parsing gin, in a fresh interpreter."""

import os
import subprocess
import sys

import pytest

from tests.train.runs import DEMO_GIN, REPO

# One binding of every configurable a run's gin files may bind (demo.gin binds the rest).
EVERY_CONFIGURABLE = [
    "DistributedConfig.enabled = False",
    "SequenceConfig.layout = 'zigzag'",
    "logical_rules.rules = (('batch', ('data', 'fsdp')),)",
    "PasskeyConfig.digits = 5",
    # Valid to parse, rejected when the run is built: the CLI got past gin, then stopped early.
    "TrainConfig.steps = 0",
]


@pytest.mark.parametrize("cli", ["lcjax.train", "lcjax.eval"])
def test_cli_knows_every_configurable_in_a_fresh_interpreter(cli, tmp_path):
  cmd = [sys.executable, "-m", cli, f"--gin_file={DEMO_GIN}", f"--workdir={tmp_path}"]
  out = subprocess.run(cmd + [f"--gin_bindings={b}" for b in EVERY_CONFIGURABLE], cwd=REPO,
                       capture_output=True, text=True)
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Error: TrainConfig.steps must be >= 1" in out.stderr, out.stderr[-3000:]
  assert "Traceback" not in out.stderr


def test_eval_cli_without_a_checkpoint_says_what_to_do(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "lcjax.eval", f"--gin_file={DEMO_GIN}", f"--workdir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 2, out.stderr[-3000:]
  assert "No checkpoint" in out.stderr and "Train first" in out.stderr
  assert "Traceback" not in out.stderr and os.listdir(tmp_path) == []  # nothing created
