"""The run directory (--workdir): made usable for training, only read for evaluation.

Both checks run before anything is built, so a wrong path fails in a second with a
`WorkdirError` naming it, instead of an OS error after compilation. Imports nothing of lcjax
but its errors: every layer may use it.
"""

import os
import tempfile

from lcjax.errors import WorkdirError

CHECKPOINTS = "checkpoints"  # the Checkpointer's subdirectory of a workdir


def prepare_workdir(path: str) -> str:
  """Creates `path` (and its parents) if needed and checks that files can be written in it;
  returns its absolute path. Raises WorkdirError naming the path and the cause."""
  root = os.path.abspath(path)
  if os.path.exists(root) and not os.path.isdir(root):
    raise WorkdirError(f"--workdir={path} ({root}) is a file, not a directory. Nothing was "
                       "changed. Give the path of a directory (a new one is created).")
  try:
    os.makedirs(root, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir={path}: cannot create {root}: {_cause(e)}. Nothing was "
                       "changed. Choose a path whose parents are directories you can write "
                       "to.") from e
  try:  # a probe file: permission bits do not tell (root, read-only mounts, immutable dirs)
    with tempfile.TemporaryFile(dir=root):
      pass
  except OSError as e:
    raise WorkdirError(f"--workdir={path}: cannot write in {root}: {_cause(e)}. Nothing was "
                       "changed. Make it writable, or choose another directory.") from e
  return root


def existing_workdir(path: str) -> str:
  """The absolute path of an existing run directory holding checkpoints/; creates nothing.
  Raises WorkdirError when the directory or its checkpoints/ do not exist."""
  root = os.path.abspath(path)
  train_first = f"Train first with `python -m lcjax.train ... --workdir={path}`."
  if not os.path.isdir(root):
    what = "is a file, not a directory" if os.path.exists(root) else "does not exist"
    raise WorkdirError(f"--workdir={path} ({root}) {what}; nothing was created. Check the "
                       f"path (the directory a training run wrote). {train_first}")
  if not os.path.isdir(os.path.join(root, CHECKPOINTS)):
    raise WorkdirError(f"No checkpoint in --workdir={path}: {os.path.join(root, CHECKPOINTS)} "
                       f"does not exist; nothing was created. Check the path. {train_first}")
  return root


def _cause(error: OSError) -> str:
  """`error`'s reason without Python's exception syntax, e.g. "Not a directory: '/a/f'"."""
  reason = error.strerror or str(error)
  return f"{reason}: {error.filename!r}" if error.filename else reason
