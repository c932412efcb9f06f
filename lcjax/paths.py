"""Paths a run writes or reads: local directories and cloud object stores (`gs://`, `s3://`)
through one abstraction, `etils.epath` (orbax uses it too). Imports nothing of lcjax: every
layer may use it.

A local path is made absolute (as the CLIs have always printed them); a `scheme://` path is
kept as given: `os.path.abspath("gs://b/run")` would turn it into `<cwd>/gs:/b/run`, and any
`os` call on it would silently create a local directory named `gs:`. Object stores have no
append and no rename of a file over another, but writing one object is atomic: `write_atomic`
and `LineLog` use each backend's way to never leave half a file.
"""

import os
import re

from etils import epath

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path) -> bool:
  """Whether `path` names a `scheme://` location (gs://, s3://, ...) rather than a local one."""
  return bool(_SCHEME.match(os.fspath(path)))


def resolve(path) -> epath.Path:
  """`path` as an epath.Path: absolute when local, unchanged when remote."""
  path = os.fspath(path)
  return epath.Path(path if is_remote(path) else os.path.abspath(path))


def absolute(path) -> str:
  """`resolve(path)` as a string (what summaries and messages print)."""
  return os.fspath(resolve(path))


def write_atomic(path, text: str) -> None:
  """Replaces the file `path` with `text`, never leaving half of it: locally through a
  temporary file (synced, then renamed over it); remotely in one object write (atomic there)."""
  path = epath.Path(path)
  if is_remote(path):
    path.write_text(text)
    return
  tmp = path.with_name(path.name + ".tmp")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


class LineLog:
  """A text file that grows by lines (metrics.jsonl). Locally it is appended to; an object
  store cannot append, so there the whole file is rewritten at each `append` (from the text
  kept in memory). `keep(line)` selects the existing lines kept when it is opened (a resumed
  run drops the ones it replays): the file is rewritten atomically if any is dropped."""

  def __init__(self, path, keep=lambda line: True):
    self.path = epath.Path(path)
    lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
    kept = [line for line in lines if keep(line)]
    if len(kept) < len(lines):
      write_atomic(self.path, "".join(kept))
    self._remote = is_remote(self.path)
    self._text = "".join(kept) if self._remote else None
    self._file = None if self._remote else open(self.path, "a", encoding="utf-8")

  def append(self, text: str) -> None:
    if self._remote:
      self._text += text
      write_atomic(self.path, self._text)
    else:
      self._file.write(text)
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
