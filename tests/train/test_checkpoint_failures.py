"""Checkpoint failure paths: a repeated save, damaged bytes in every kind of file, a changed
model (mismatch, not corruption), falling back past a damaged checkpoint, and a failed
background save (a file-size limit standing in for a full disk)."""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.config import binding_changes
from lcjax.errors import CheckpointCorruptError, CheckpointMismatchError
from lcjax.train import manifest
from lcjax.train.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = ("# Parameters for ModelConfig:\nModelConfig.d_model = 32\nModelConfig.tasks = \\\n"
          "    ('a',\n     'b')\nOptimConfig.peak_learning_rate = 0.005\n")


def _state(d_model: int = 32, embed_dtype=jnp.float32) -> dict:
  """A train-state-like tree (random values, so array files are not compressed away)."""
  keys = jax.random.split(jax.random.key(0), 3)
  params = {"embed": jax.random.normal(keys[0], (96, d_model), embed_dtype),
            "layers": [{"w": jax.random.normal(k, (d_model, 48))} for k in keys[1:]]}
  return {"step": jnp.asarray(7, jnp.int32), "params": params,
          "opt_state": (jax.tree.map(jnp.zeros_like, params), jnp.asarray(3, jnp.int32))}


def _abstract(**kwargs) -> dict:
  return jax.eval_shape(lambda: _state(**kwargs))


def _saved(workdir, steps=(2,)) -> Checkpointer:
  ckpt = Checkpointer(str(workdir), every=1, keep=5)
  for step in steps:
    assert ckpt.save(step, _state(), f"iterator at {step}".encode(), CONFIG)
  ckpt.wait()
  return ckpt


def _damage(path: str, how: str, rng=None) -> None:
  with open(path, "rb") as f:
    data = bytearray(f.read())
  middle = len(data) // 2
  if how == "flip":
    data[middle] ^= 0x01
  elif how == "truncate":
    data = data[:middle]
  else:  # the case: 64 random bytes written into the middle
    data[middle:middle + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
  with open(path, "wb") as f:
    f.write(data)


def test_saving_a_step_twice_is_a_no_op(tmp_path):
  ckpt = Checkpointer(str(tmp_path), every=2, keep=3)
  assert ckpt.save(2, _state(), b"it", CONFIG)
  assert not ckpt.save(2, _state(), b"it", CONFIG, force=True)  # still being written
  ckpt.wait()
  assert not ckpt.save(2, _state(), b"it", CONFIG, force=True)  # SIGTERM right after a save
  assert not ckpt.save(2, _state(), b"it", CONFIG)
  ckpt.check()
  assert ckpt.all_steps() == [2]
  assert ckpt.restore(2, _abstract(), CONFIG)[1] == b"it"
  assert ckpt.config_of(2) == CONFIG
  ckpt.close()


def test_every_kind_of_file_damaged_is_detected(tmp_path):
  ckpt = _saved(tmp_path, steps=(2, 4))
  step_dir = os.path.join(ckpt.directory, "4")
  files = manifest.files(step_dir) + [manifest.NAME]
  kinds = sorted({re.sub(r"[0-9a-f]{32}", "<hash>", re.sub(r"process_\d+", "process_<i>", f))
                  for f in files})
  print(f"{len(kinds)} kinds of file in a checkpoint: {kinds}")
  assert {"_CHECKPOINT_METADATA", "state/_METADATA", "state/_sharding", "state/manifest.ocdbt",
          "state/ocdbt.process_<i>/d/<hash>", "data/metadata", "config/metadata",
          manifest.NAME} <= set(kinds)
  for rel in files:
    path = os.path.join(step_dir, rel)
    with open(path, "rb") as f:
      original = f.read()
    assert len(original) > 1, rel
    for how in ("flip", "truncate"):
      _damage(path, how)
      with pytest.raises(CheckpointCorruptError) as err:
        ckpt.restore(4, _abstract(), CONFIG)
      message = str(err.value)
      assert f"step 4 in {step_dir} is damaged" in message, (rel, how, message)
      assert rel in message and "[2]" in message and "fallback" in message, (rel, how, message)
      with open(path, "wb") as f:
        f.write(original)
  assert ckpt.restore(4, _abstract(), CONFIG)[1] == b"iterator at 4"  # intact again: restores
  ckpt.close()


def test_random_bytes_in_a_data_file_are_detected(tmp_path, rng):
  ckpt = _saved(tmp_path)
  step_dir = os.path.join(ckpt.directory, "2")
  data_files = [f for f in manifest.files(step_dir) if re.search(r"/d/[0-9a-f]{32}$", f)]
  largest = max(data_files, key=lambda f: os.path.getsize(os.path.join(step_dir, f)))
  _damage(os.path.join(step_dir, largest), "random", rng)
  with pytest.raises(CheckpointCorruptError, match=re.escape(f"{largest}: its sha256 differs")):
    ckpt.restore(2, _abstract(), CONFIG)
  ckpt.close()


def test_a_checkpoint_without_manifest_restores_unverified(tmp_path, capsys):
  ckpt = _saved(tmp_path)
  os.remove(os.path.join(ckpt.directory, "2", manifest.NAME))
  assert ckpt.restore(2, _abstract(), CONFIG)[1] == b"iterator at 2"
  assert "restoring it unverified" in capsys.readouterr().out
  _damage(os.path.join(ckpt.directory, "2", "state", "_METADATA"), "truncate")
  with pytest.raises(CheckpointCorruptError, match="orbax could not read it"):
    ckpt.restore(2, _abstract(), CONFIG)
  ckpt.close()


def test_a_changed_model_is_a_mismatch_naming_parameters_and_bindings(tmp_path):
  ckpt = _saved(tmp_path)
  wider = CONFIG.replace("d_model = 32", "d_model = 64") + "ModelConfig.new = True\n"
  for abstract, named in [
      (_abstract(d_model=64), "params.embed float32[96, 32] -> float32[96, 64]"),
      (_abstract(embed_dtype=jnp.bfloat16), "params.embed float32[96, 32] -> bfloat16[96, 32]"),
      ({**_abstract(), "extra": jax.ShapeDtypeStruct((3,), jnp.float32)},
       "1 not in the checkpoint: extra float32[3]"),
      ({k: v for k, v in _abstract().items() if k != "step"},
       "1 in the checkpoint, not in the model: step int32[]")]:
    for fallback in (False, True):  # a mismatch never falls back
      with pytest.raises(CheckpointMismatchError) as err:
        ckpt.restore_latest(abstract, wider, fallback=fallback)
      message = str(err.value)
      assert named in message and "is intact" in message, message
      assert "ModelConfig.d_model: 32 -> 64" in message, message
      assert "added ModelConfig.new = True" in message, message
      assert os.path.join(ckpt.directory, "2", "config", "metadata") in message
      assert "--workdir" in message and "delet" not in message.lower()
      assert not isinstance(err.value, CheckpointCorruptError)
  assert ckpt.all_steps() == [2] and not os.path.exists(tmp_path / "quarantine")
  ckpt.close()


def test_fallback_sets_the_damaged_newest_aside(tmp_path, capsys):
  ckpt = _saved(tmp_path, steps=(2, 4))
  _damage(os.path.join(ckpt.directory, "4", "data", "metadata"), "flip")
  with pytest.raises(CheckpointCorruptError, match="step 4"):
    ckpt.restore_latest(_abstract(), CONFIG)
  state, data_state, step = ckpt.restore_latest(_abstract(), CONFIG, fallback=True)
  assert (step, data_state) == (2, b"iterator at 2")
  np.testing.assert_array_equal(state["params"]["embed"], _state()["params"]["embed"])
  moved = str(tmp_path / "quarantine" / "4-corrupt")
  assert os.path.isfile(os.path.join(moved, "data", "metadata"))  # kept, not deleted
  out = capsys.readouterr().out
  assert "Skipped damaged checkpoint step 4 (data/metadata: " in out and moved in out
  assert ckpt.all_steps() == [2]
  assert ckpt.save(4, _state(), b"again", CONFIG)  # orbax no longer sees the old step 4
  ckpt.close()
  assert Checkpointer(str(tmp_path), 1, 5, create=False).all_steps() == [2, 4]


def test_no_checkpoints_directory_is_created_when_create_is_false(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "typo"), every=1, keep=1, create=False)
  assert ckpt.all_steps() == [] and ckpt.restore_latest(_abstract(), CONFIG) is None
  assert not os.path.exists(tmp_path / "typo")


_FAILING_SAVE = """
import json, resource, signal, sys, time
from lcjax.errors import CheckpointWriteError
from lcjax.train.checkpoint import Checkpointer
from tests.train.test_checkpoint_failures import CONFIG, _state

ckpt = Checkpointer(sys.argv[1], every=1, keep=1)  # keep=1: step 2 would replace step 1
ckpt.save(1, _state(), b"it", CONFIG)
ckpt.wait()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))
ckpt.save(2, _state(), b"it", CONFIG)
checks = 0
while True:  # the train loop calls check() after every step
  checks += 1
  try:
    ckpt.check()
  except CheckpointWriteError as e:
    print(json.dumps({"error": str(e), "checks": checks}))
    break
  time.sleep(0.01)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
ckpt.close()  # no second copy of the error
"""


def test_a_failed_background_save_stops_with_one_message(tmp_path):
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_FAILING_SAVE), str(tmp_path)],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  message = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
  print(message)
  checkpoints = os.path.join(tmp_path, "checkpoints")
  assert f"Saving checkpoint step 2 to {checkpoints}/2 failed: File too large" in message
  assert "step 1 (intact, checksums verified)" in message and "KiB" in message
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert sorted(os.listdir(checkpoints)) == ["1"]  # no *.orbax-checkpoint-tmp left behind
  ckpt = Checkpointer(str(tmp_path), every=1, keep=1, create=False)
  assert ckpt.restore(1, _abstract(), CONFIG)[1] == b"it"
  ckpt.close()


def test_binding_changes():
  old = ("# Parameters for A:\n# ====\nA.x = 1\nA.long = \\\n    ['a',\n     'b']\n"
         "A.gone = 'y'\nscope/B.z = (1, 2)\n")
  new = ("A.x = 2\nA.long = ['a', 'b']\nscope/B.z = (1,\n  3)\nC.added = {'k': 'v = w'}\n")
  assert binding_changes(old, new) == [
      "removed A.gone = 'y'",
      "A.x: 1 -> 2",
      "added C.added = {'k': 'v = w'}",
      "scope/B.z: (1, 2) -> (1, 3)",
  ]
  assert binding_changes(old, old) == []
