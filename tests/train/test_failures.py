"""The train loop's failure paths, as real runs on CPU: what the user sees and what is kept.

Damaged bytes, checksums and failed writes at the checkpoint level: test_checkpoint_failures.py;
the CLIs' messages and exit codes: test_cli_errors.py; random SIGKILLs: test_crash_resume.py.
"""

import glob
import math
import os
import re
import resource
import shutil
import signal
import time

import pytest

from lcjax.errors import (
  CheckpointCorruptError,
  CheckpointMismatchError,
  ConfigError,
  NonFiniteLossError,
)
from tests.train.runs import (
  IGNORING_SIGXFSZ,
  bindings,
  read_jsonl,
  start_cli,
  train_in_process,
  train_losses,
  train_steps,
  wait_for_step,
)


def _checkpoints(workdir) -> list[int]:
  return sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())


def test_divergence_names_a_checkpoint_that_resumes(tmp_path):
  """lr 1e30 from step 2 on, a checkpoint every step: the message names the newest checkpoint
  whose next step was finite, and rerunning with a sane learning rate resumes from it."""
  common = dict(TrainConfig__steps=6, TrainConfig__checkpoint_every=1,
                TrainConfig__eval_every=1000, OptimConfig__warmup_steps=1,
                OptimConfig__clip_norm=1e30)
  with pytest.raises(NonFiniteLossError, match="diverged at step") as err:
    train_in_process(tmp_path, bindings(**common, OptimConfig__peak_learning_rate=1e30))
  message = str(err.value)
  bad = int(re.search(r"diverged at step (\d+)", message).group(1))
  good = int(re.search(r"newest good checkpoint is step (\d+)", message).group(1))
  assert good < bad and _checkpoints(tmp_path)[-1] == good
  assert "peak_learning_rate (now 1e+30)" in message
  set_aside = glob.glob(str(tmp_path / "quarantine" / "*"))
  assert all(int(os.path.basename(p).split("-")[0]) > good for p in set_aside)

  summary = train_in_process(tmp_path, bindings(**common, OptimConfig__peak_learning_rate=1e-3))
  assert summary["step"] == 6
  losses = train_losses(tmp_path)
  assert train_steps(tmp_path) == list(range(1, 7))  # the diverged lines were replaced
  assert all(math.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("checkpoint_every", [1, 10_000], ids=["on-a-checkpoint-step", "between"])
def test_sigterm_saves_the_current_step_and_exits_0(tmp_path, checkpoint_every):
  """With a checkpoint every step, the preemption save always finds its step just saved."""
  proc = start_cli(tmp_path, bindings(TrainConfig__steps=10_000, TrainConfig__eval_every=10_000,
                                      TrainConfig__checkpoint_every=checkpoint_every))
  wait_for_step(tmp_path, proc, 3)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  step = int(re.search(r"SIGTERM: checkpoint step (\d+) is saved", out).group(1))
  assert step >= 3 and step == _checkpoints(tmp_path)[-1] == max(train_losses(tmp_path))
  assert "Traceback" not in out


def test_changed_model_on_resume_is_a_mismatch_and_keeps_the_record(tmp_path):
  common = dict(TrainConfig__steps=2, TrainConfig__checkpoint_every=2,
                TrainConfig__eval_every=1000)
  train_in_process(tmp_path, bindings(**common))
  written = (tmp_path / "config.gin").read_text()
  with pytest.raises(CheckpointMismatchError) as err:
    train_in_process(tmp_path, bindings(**common, ModelConfig__d_model=64))
  message = str(err.value)
  assert "ModelConfig.d_model: 32 -> 64" in message
  assert "corrupt" not in message.lower() and "delete" not in message.lower()
  assert (tmp_path / "config.gin").read_text() == written  # the record is not overwritten
  assert _checkpoints(tmp_path) == [2]


def test_changed_steps_on_resume_is_refused(tmp_path):
  common = dict(TrainConfig__checkpoint_every=2, TrainConfig__eval_every=1000)
  train_in_process(tmp_path, bindings(**common, TrainConfig__steps=4))
  with pytest.raises(ConfigError, match=r"TrainConfig.steps: 4 -> 6"):
    train_in_process(tmp_path, bindings(**common, TrainConfig__steps=6))
  assert _checkpoints(tmp_path) == [2, 4]


def test_corrupt_newest_checkpoint_stops_or_falls_back(tmp_path):
  common = bindings(TrainConfig__steps=4, TrainConfig__checkpoint_every=2,
                    TrainConfig__eval_every=1000)
  train_in_process(tmp_path, common)
  data_files = glob.glob(str(tmp_path / "checkpoints" / "4" / "state" / "**" / "d" / "*"),
                         recursive=True)
  with open(data_files[0], "r+b") as f:  # a bit flip in the middle of the arrays
    f.seek(os.path.getsize(data_files[0]) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))
  with pytest.raises(CheckpointCorruptError, match="step 4") as err:
    train_in_process(tmp_path, common)
  assert "fallback" in str(err.value)
  assert _checkpoints(tmp_path) == [2, 4]  # stopping moves nothing

  train_in_process(tmp_path, common + ["TrainConfig.on_corrupt_checkpoint = 'fallback'"])
  assert _checkpoints(tmp_path) == [2, 4]  # resumed from 2; 4 written again
  assert [os.path.basename(p).split("-")[0]
          for p in glob.glob(str(tmp_path / "quarantine" / "*"))] == ["4"]
  assert train_steps(tmp_path) == [1, 2, 3, 4]


def test_resume_replaces_replayed_metrics_and_purges_tensorboard(tmp_path):
  """A run that stopped after logging step 4 but before checkpointing it: the resumed run
  replays steps 3-4; metrics.jsonl keeps one line per step, and TensorBoard's purge marker at
  step 3 hides the first event file's steps 3-4."""
  common = bindings(TrainConfig__steps=4, TrainConfig__checkpoint_every=2,
                    TrainConfig__eval_every=1000)
  train_in_process(tmp_path, common)
  first = train_losses(tmp_path)
  shutil.move(str(tmp_path / "checkpoints" / "4"), str(tmp_path / "step4"))
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "loss": 1.0')  # a line cut short by a kill
  train_in_process(tmp_path, common)
  assert train_steps(tmp_path) == [1, 2, 3, 4]
  assert train_losses(tmp_path) == first

  from tensorflow.compat.v1.train import summary_iterator
  seen: dict[int, int] = {}
  for path in sorted(glob.glob(str(tmp_path / "tb" / "events.*")), key=os.path.getmtime):
    for event in summary_iterator(path):
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        seen = {s: n for s, n in seen.items() if s < event.step}  # what TensorBoard purges
      for value in event.summary.value:
        if value.tag == "loss":
          seen[event.step] = seen.get(event.step, 0) + 1
  assert seen == {1: 1, 2: 1, 3: 1, 4: 1}
  assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["step"] == 4


def test_full_disk_stops_at_the_next_step_with_one_message(tmp_path):
  """After the step-2 checkpoint, files may no longer grow past 16 KiB (RLIMIT_FSIZE, set from
  outside on the running process: a write past it fails with EFBIG as a full disk fails with
  ENOSPC). The step-4 checkpoint's arrays do not fit; the metrics files still do."""
  common = bindings(TrainConfig__steps=40, TrainConfig__checkpoint_every=2,
                    TrainConfig__eval_every=1000, TrainConfig__keep_checkpoints=5)
  proc = start_cli(tmp_path, common, launcher=IGNORING_SIGXFSZ)
  wait_for_step(tmp_path, proc, 2)
  while _checkpoints(tmp_path) != [2] or not os.path.exists(
      tmp_path / "checkpoints" / "2" / "lcjax.sha256.json"):
    time.sleep(0.01)
  resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 1, out
  assert "Traceback" not in out, out
  error = [line for line in out.splitlines() if line.startswith("Error:")]
  assert len(error) == 1 and "File too large" in error[0], out
  failed = int(re.search(r"Saving checkpoint step (\d+)", error[0]).group(1))
  assert "step 2 (intact, checksums verified)" in error[0]
  assert max(train_losses(tmp_path)) <= failed + 1  # it stopped at the step after the save
  assert os.listdir(tmp_path / "checkpoints") == ["2"]  # no *.orbax-checkpoint-tmp left

  summary = train_in_process(tmp_path, common)  # space is back: resume from step 2
  assert summary["step"] == 40 and train_steps(tmp_path) == list(range(1, 41))
