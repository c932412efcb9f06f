"""End-to-end tests of the train loop on CPU: learning, resuming, preemption, failures, meshes."""

import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest

from lcjax.train.checkpoint import CheckpointError
from lcjax.train.loop import NonFiniteLossError
from tests.train.runs import (
  bindings,
  read_jsonl,
  start_cli,
  train_in_process,
  train_losses,
  wait_for_step,
)


def test_tiny_run_learns_and_writes_outputs(tmp_path):
  summary = train_in_process(tmp_path, bindings(TrainConfig__steps=20, TrainConfig__eval_every=20,
                                                TrainConfig__checkpoint_every=10))
  losses = train_losses(tmp_path)
  assert sorted(losses) == list(range(1, 21))
  assert np.mean([losses[s] for s in (18, 19, 20)]) < 0.8 * np.mean([losses[s] for s in (1, 2, 3)])
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  for key in ("loss", "grad_norm", "lr", "tokens_per_sec", "mfu", "step_time"):
    assert key in rows[0], key
  assert any("eval/lcjax_passkey/exact_match" in r for r in rows)
  operative = (tmp_path / "config.gin").read_text()
  assert operative.count("ModelConfig.d_model = 32") == 1
  assert "MqarConfig.num_pairs = 8" in operative  # data task configs are recorded too
  assert os.listdir(tmp_path / "tb")
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [10, 20]
  assert summary["step"] == 20 and summary["eval"]


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
  """2N steps straight == N steps, SIGKILL mid-interval, resume, the rest: loss for loss."""
  overrides = dict(TrainConfig__steps=24, TrainConfig__eval_every=1000,
                   TrainConfig__checkpoint_every=8)
  straight = tmp_path / "straight"
  train_in_process(straight, bindings(**overrides))

  killed = tmp_path / "killed"
  proc = start_cli(killed, bindings(**overrides))
  wait_for_step(killed, proc, 11)  # past the step-8 checkpoint, before the next one
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  train_in_process(killed, bindings(**overrides))  # resumes from the newest checkpoint

  expected, got = train_losses(straight), train_losses(killed)
  assert sorted(got) == sorted(expected) == list(range(1, 25))
  # Same program, same inputs, same restored bits: identical on CPU, not merely close.
  assert [got[s] for s in range(1, 25)] == [expected[s] for s in range(1, 25)]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  proc = start_cli(tmp_path, bindings(TrainConfig__steps=10_000, TrainConfig__eval_every=10_000,
                                      TrainConfig__checkpoint_every=10_000))
  wait_for_step(tmp_path, proc, 3)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "SIGTERM: saved checkpoint at step" in out
  saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert len(saved) == 1 and saved[0] >= 3
  assert saved[0] == max(train_losses(tmp_path))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  with pytest.raises(NonFiniteLossError, match="non-finite at step") as err:
    train_in_process(tmp_path, bindings(TrainConfig__steps=50, TrainConfig__checkpoint_every=1,
                                        OptimConfig__peak_learning_rate=1e30,
                                        OptimConfig__warmup_steps=1,
                                        OptimConfig__clip_norm=1e30))
  saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert saved, "the first steps were finite and should have been checkpointed"
  bad = int(re.search(r"at step (\d+)", str(err.value)).group(1))
  assert max(saved) < bad
  assert f"last good one is step {max(saved)}" in str(err.value)


def test_corrupt_latest_checkpoint_names_it_and_the_fallback(tmp_path):
  common = bindings(TrainConfig__steps=4, TrainConfig__checkpoint_every=2,
                    TrainConfig__eval_every=1000)
  train_in_process(tmp_path, common)
  state_dir = tmp_path / "checkpoints" / "4" / "state"
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(CheckpointError) as err:
    train_in_process(tmp_path, bindings(TrainConfig__steps=6, TrainConfig__checkpoint_every=2,
                                        TrainConfig__eval_every=1000))
  message = str(err.value)
  assert "step 4" in message and "[2]" in message and "move or delete" in message
  shutil.rmtree(tmp_path / "checkpoints" / "4")  # the documented fallback works
  train_in_process(tmp_path, bindings(TrainConfig__steps=6, TrainConfig__checkpoint_every=2,
                                      TrainConfig__eval_every=1000))
  assert max(train_losses(tmp_path)) == 6


def test_data2_fsdp4_mesh_matches_one_device(tmp_path, monkeypatch):
  overrides = dict(TrainConfig__steps=5, TrainConfig__eval_every=1000,
                   TrainConfig__checkpoint_every=1000)
  sharded = tmp_path / "sharded"
  train_in_process(sharded, bindings(**overrides) + ["MeshConfig.data = 2", "MeshConfig.fsdp = 4"])
  one = tmp_path / "one"
  devices = jax.devices()
  monkeypatch.setattr("lcjax.parallel.mesh.jax.devices", lambda: devices[:1])
  train_in_process(one, bindings(**overrides) + ["MeshConfig.data = 1"])
  a, b = train_losses(sharded), train_losses(one)
  # Reductions are split differently across devices: equal up to float32 rounding.
  np.testing.assert_allclose([a[s] for s in range(1, 6)], [b[s] for s in range(1, 6)],
                             rtol=2e-5)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
  overrides = dict(TrainConfig__steps=4, TrainConfig__eval_every=1000,
                   TrainConfig__checkpoint_every=1000, TrainConfig__batch_size=16)
  train_in_process(tmp_path / "a", bindings(**overrides))
  train_in_process(tmp_path / "b", bindings(**overrides) + ["TrainConfig.grad_accum_steps = 2"])
  a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
  np.testing.assert_allclose([a[s] for s in range(1, 5)], [b[s] for s in range(1, 5)], rtol=2e-5)
