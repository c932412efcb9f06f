"""Helpers for tests that run real (tiny) training jobs through gin, in-process or as a CLI."""

import json
import os
import subprocess
import sys
import time

import gin

# What the CLIs import before parsing gin: every configurable a run's gin files may bind.
import lcjax.eval.suite  # noqa: F401
import lcjax.models.allocation  # noqa: F401
import lcjax.run  # noqa: F401
import lcjax.train.distributed  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_GIN = os.path.join(REPO, "configs", "demo.gin")

# A model and data small enough that a step takes milliseconds on CPU.
TINY = [
    "ModelConfig.d_model = 32",
    "ModelConfig.pattern = '*-'",
    "AttentionConfig.num_heads = 2",
    "AttentionConfig.num_kv_heads = 1",
    "AttentionConfig.head_dim = 16",
    "MLPConfig.hidden_dim = 64",
    "ModelConfig.embed_init_std = None",  # init_std, as every other parameter of the tiny model
    "DataConfig.sequence_length = 128",
    "MqarConfig.num_pairs = 8",
    "MqarConfig.num_queries = 4",
    "TrainConfig.batch_size = 8",
    "TrainConfig.log_every = 1",
    "TrainConfig.eval_batches = 1",
    "OptimConfig.warmup_steps = 2",
]


def bindings(**overrides) -> list[str]:
  """TINY plus `Class__field=value` overrides."""
  extra = [f"{k.replace('__', '.')} = {v!r}" for k, v in overrides.items()]
  return TINY + extra


def train_in_process(workdir, extra_bindings):
  from lcjax.config import parse_gin
  from lcjax.train.loop import train

  gin.clear_config()
  parse_gin([DEMO_GIN], extra_bindings)
  try:
    return train(str(workdir))
  finally:
    gin.clear_config()


# Runs `python ARGS` with SIGXFSZ ignored (a disposition exec keeps): a write past the file-size
# limit then fails with EFBIG, as one on a full disk fails with ENOSPC, instead of killing it.
IGNORING_SIGXFSZ = ("-c", "import os, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def start_cli(workdir, extra_bindings, launcher=()) -> subprocess.Popen:
  cmd = [sys.executable, *launcher, "-m", "lcjax.train", f"--gin_file={DEMO_GIN}",
         f"--workdir={workdir}", *(f"--gin_bindings={b}" for b in extra_bindings)]
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=os.environ.copy())


def wait_for_step(workdir, proc, step, timeout=300.0) -> int:
  """Blocks until metrics.jsonl logs `step` (returns the newest logged step)."""
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(path):
      steps = [r["step"] for r in read_jsonl(path) if "loss" in r]
      if steps and max(steps) >= step:
        return max(steps)
    if proc.poll() is not None:
      raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stdout.read()}")
    time.sleep(0.02)
  raise TimeoutError(f"step {step} not logged within {timeout}s")


def read_jsonl(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def train_steps(workdir) -> list[int]:
  """The steps of metrics.jsonl's training lines, in file order (eval lines left out)."""
  return [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


def train_losses(workdir) -> dict[int, float]:
  """step -> loss of metrics.jsonl's training lines."""
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "loss" in r}
