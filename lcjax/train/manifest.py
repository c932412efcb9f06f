"""A checkpoint's checksum manifest: the size and sha256 of every file of a step directory, in
DIR/checkpoints/<step>/lcjax.sha256.json (orbax reads only the files it wrote and ignores it).

orbax (zarr3 / OCDBT) checksums only its shard indices, so damaged array bytes restore without
error; this manifest is checked before any of them is read. sha256 rather than zlib.crc32: on
a 1 GiB file (page cache, one core) hashlib reads ~1.1 GB/s, crc32 ~1.7 GB/s, not enough faster
to give up a cryptographic digest, and both release the GIL while the background save hashes.
"""

import hashlib
import json
import os

NAME = "lcjax.sha256.json"


def files(step_dir: str) -> list[str]:
  """Every file under `step_dir` (relative paths, sorted), the manifest itself excepted."""
  found = []
  for root, _, names in os.walk(step_dir):
    found += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
  return sorted(f for f in found if not f.startswith(NAME))


def write(step_dir: str) -> None:
  """Writes the manifest of `step_dir` (to a temporary name, then renamed: never half of one)."""
  entries = {rel: {"bytes": os.path.getsize(os.path.join(step_dir, rel)),
                   "sha256": _sha256(os.path.join(step_dir, rel))} for rel in files(step_dir)}
  path = os.path.join(step_dir, NAME)
  try:
    with open(path + ".tmp", "w") as f:
      json.dump({"algorithm": "sha256", "files": entries, "manifest_sha256": _digest(entries)},
                f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
  finally:
    if os.path.exists(path + ".tmp"):
      os.remove(path + ".tmp")


def problems(step_dir: str) -> list[str] | None:
  """What is wrong with `step_dir`'s files, one line each ([] when every file matches), or None
  when it has no manifest (unverifiable). Files the manifest does not list are not checked."""
  path = os.path.join(step_dir, NAME)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      written = json.load(f)
    listed = written["files"]
    expected = {str(rel): (int(e["bytes"]), str(e["sha256"])) for rel, e in listed.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return [f"{NAME}: unreadable ({type(e).__name__}: {e})"]
  if _digest(listed) != written.get("manifest_sha256"):  # tells its own damage from the files'
    return [f"{NAME}: its own sha256 differs from the one written (bytes changed)"]
  found = []
  for rel, (size, digest) in sorted(expected.items()):
    file = os.path.join(step_dir, rel)
    try:
      actual = os.path.getsize(file)
      if actual != size:
        found.append(f"{rel}: {actual} bytes, {size} were written")
      elif _sha256(file) != digest:
        found.append(f"{rel}: its sha256 differs from the one written (bytes changed)")
    except FileNotFoundError:
      found.append(f"{rel}: missing")
    except OSError as e:
      found.append(f"{rel}: unreadable ({e.strerror or e})")
  return found


def size(step_dir: str) -> int:
  """Bytes of every file under `step_dir`."""
  return sum(os.path.getsize(os.path.join(step_dir, rel)) for rel in files(step_dir))


def _digest(entries: dict) -> str:
  return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()
