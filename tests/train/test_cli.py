"""The CLIs parse gin before importing anything else, so every configurable must be known."""

import subprocess
import sys

from tests.train.runs import DEMO_GIN, REPO


def test_parse_gin_knows_every_configurable_in_a_fresh_interpreter():
  code = (
      "from lcjax.config import parse_gin\n"
      f"parse_gin([{DEMO_GIN!r}], ['DistributedConfig.enabled = False'])\n"
      "from lcjax.models.config import ModelConfig, num_params\n"
      "print('params', num_params(ModelConfig()))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "params" in out.stdout


def test_eval_cli_without_a_checkpoint_says_what_to_do(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "lcjax.eval", f"--gin_file={DEMO_GIN}", f"--workdir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True)
  assert out.returncode != 0
  assert "No checkpoint" in out.stderr and "Train first" in out.stderr
