"""The run directory (--workdir): made usable for training, only read for evaluation.

Both checks run before anything is built, so a wrong path fails in a second with a
`WorkdirError` naming it, instead of an OS error after compilation. A workdir may be local or
on an object store (`gs://bucket/run`: lcjax.paths). Imports nothing of lcjax but its errors
and lcjax.paths: every layer may use it.
"""

import tempfile
import uuid

from lcjax.errors import WorkdirError
from lcjax.paths import is_remote, resolve

CHECKPOINTS = "checkpoints"  # the Checkpointer's subdirectory of a workdir


def prepare_workdir(path: str) -> str:
  """Creates `path` (and its parents) if needed and checks that files can be written in it;
  returns its absolute path (a remote one as given). Raises WorkdirError naming the path and
  the cause."""
  root = resolve(path)
  if root.exists() and not root.is_dir():
    raise WorkdirError(f"--workdir={path} ({root}) is a file, not a directory. Nothing was "
                       "changed. Give the path of a directory (a new one is created).")
  try:
    root.mkdir(parents=True, exist_ok=True)
  except Exception as e:  # an OSError locally; each object store's client has its own types
    raise WorkdirError(f"--workdir={path}: cannot create {root}: {_cause(e)}. Nothing was "
                       "changed. Choose a path whose parents are directories you can write "
                       "to.") from e
  try:  # a probe file: permission bits do not tell (root, read-only mounts, immutable dirs)
    _probe(root)
  except Exception as e:
    raise WorkdirError(f"--workdir={path}: cannot write in {root}: {_cause(e)}. Nothing was "
                       "changed. Make it writable, or choose another directory.") from e
  return str(root)


def _probe(root) -> None:
  """Writes and deletes a file in `root`: locally an unnamed one (nothing is left even if the
  process dies), remotely a uniquely named object."""
  if not is_remote(root):
    with tempfile.TemporaryFile(dir=root):
      return
  probe = root / f".lcjax-write-probe-{uuid.uuid4().hex}"
  probe.write_text("")
  probe.unlink()


def existing_workdir(path: str) -> str:
  """The absolute path (a remote one as given) of an existing run directory holding
  checkpoints/; creates nothing. Raises WorkdirError when the directory or its checkpoints/ do
  not exist."""
  root = resolve(path)
  train_first = f"Train first with `python -m lcjax.train ... --workdir={path}`."
  if not root.is_dir():
    what = "is a file, not a directory" if root.exists() else "does not exist"
    raise WorkdirError(f"--workdir={path} ({root}) {what}; nothing was created. Check the "
                       f"path (the directory a training run wrote). {train_first}")
  if not (root / CHECKPOINTS).is_dir():
    raise WorkdirError(f"No checkpoint in --workdir={path}: {root / CHECKPOINTS} "
                       f"does not exist; nothing was created. Check the path. {train_first}")
  return str(root)


def _cause(error: Exception) -> str:
  """`error`'s reason without Python's exception syntax, e.g. "Not a directory: '/a/f'"."""
  reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
  filename = getattr(error, "filename", None)
  return f"{reason}: {filename!r}" if filename else reason
