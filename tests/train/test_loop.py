"""End-to-end tests of the train loop on CPU: learning, resuming, meshes. Failure paths (NaN,
preemption, damaged or mismatched checkpoints) are in test_failures.py."""

import os
import signal

import jax
import numpy as np
import pytest

from tests.train.runs import (
  bindings,
  read_jsonl,
  start_cli,
  train_in_process,
  train_losses,
  train_steps,
  wait_for_step,
)


def test_tiny_run_learns_and_writes_outputs(tmp_path):
  summary = train_in_process(tmp_path, bindings(TrainConfig__steps=20, TrainConfig__eval_every=20,
                                                TrainConfig__checkpoint_every=10,
                                                TrainConfig__profile_steps=(4, 5)))
  losses = train_losses(tmp_path)
  assert sorted(losses) == list(range(1, 21))
  assert np.mean([losses[s] for s in (18, 19, 20)]) < 0.8 * np.mean([losses[s] for s in (1, 2, 3)])
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  for key in ("loss", "grad_norm", "lr", "tokens_per_sec", "mfu", "step_time"):
    assert key in rows[0], key
  assert any("eval/lcjax_passkey/exact_match" in r for r in rows)
  operative = (tmp_path / "config.gin").read_text()
  assert (tmp_path / "config.0.gin").read_text() == operative  # the record of each (re)start
  assert operative.count("ModelConfig.d_model = 32") == 1
  assert "MqarConfig.num_pairs = 8" in operative  # data task configs are recorded too
  assert os.listdir(tmp_path / "tb")
  traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files]
  assert any(f.endswith(".xplane.pb") for f in traces), traces  # TensorBoard's profile plugin
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
  # The steps replayed after the resume replace the interrupted run's lines: one per step.
  assert train_steps(killed) == train_steps(straight) == list(range(1, 25))
  # Same program, same inputs, same restored bits: identical on CPU, not merely close.
  assert [got[s] for s in range(1, 25)] == [expected[s] for s in range(1, 25)]


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
