"""A checkpoint's checksum manifest: the size and sha256 of every file of a step directory, in
DIR/checkpoints/<step>/lcjax.sha256.json (orbax reads only the files it wrote and ignores it).

orbax (zarr3 / OCDBT) checksums only its shard indices, so damaged array bytes restore without
error; this manifest is checked before any of them is read. sha256 rather than zlib.crc32: on
a 1 GiB file (page cache, one core) hashlib reads ~1.1 GB/s, crc32 ~1.7 GB/s, not enough faster
to give up a cryptographic digest, and both release the GIL while the background save hashes.
Step directories may be local or remote (gs://): every access goes through epath.
"""

import hashlib
import json

from etils import epath

from lcjax import paths

NAME = "lcjax.sha256.json"


def files(step_dir) -> list[str]:
  """Every file under `step_dir` (relative paths, sorted), the manifest itself excepted."""
  top, found = epath.Path(step_dir), []
  for root, _, names in top.walk():
    found += [str((epath.Path(root) / n).relative_to(top)) for n in names]
  return sorted(f for f in found if not f.startswith(NAME))


def write(step_dir) -> None:
  """Writes the manifest of `step_dir` (atomically: never half of one)."""
  top = epath.Path(step_dir)
  entries = {rel: {"bytes": _bytes(top / rel), "sha256": _sha256(top / rel)}
             for rel in files(top)}
  paths.write_atomic(top / NAME, json.dumps(
      {"algorithm": "sha256", "files": entries, "manifest_sha256": _digest(entries)},
      indent=1, sort_keys=True))


def problems(step_dir: str) -> list[str] | None:
  """What is wrong with `step_dir`'s files, one line each ([] when every file matches), or None
  when it has no manifest (unverifiable). Files the manifest does not list are not checked."""
  path = epath.Path(step_dir) / NAME
  if not path.exists():
    return None
  try:
    written = json.loads(path.read_text())
    listed = written["files"]
    expected = {str(rel): (int(e["bytes"]), str(e["sha256"])) for rel, e in listed.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return [f"{NAME}: unreadable ({type(e).__name__}: {e})"]
  if _digest(listed) != written.get("manifest_sha256"):  # tells its own damage from the files'
    return [f"{NAME}: its own sha256 differs from the one written (bytes changed)"]
  found = []
  for rel, (size, digest) in sorted(expected.items()):
    file = epath.Path(step_dir) / rel
    try:
      actual = _bytes(file)
      if actual != size:
        found.append(f"{rel}: {actual} bytes, {size} were written")
      elif _sha256(file) != digest:
        found.append(f"{rel}: its sha256 differs from the one written (bytes changed)")
    except FileNotFoundError:
      found.append(f"{rel}: missing")
    except OSError as e:
      found.append(f"{rel}: unreadable ({e.strerror or e})")
  return found


def size(step_dir) -> int:
  """Bytes of every file under `step_dir`."""
  return sum(_bytes(epath.Path(step_dir) / rel) for rel in files(step_dir))


def _bytes(path: epath.Path) -> int:
  # Not path.stat(): locally it looks up the owner's name, which fails for a uid without one.
  with path.open("rb") as f:
    return f.seek(0, 2)


def _digest(entries: dict) -> str:
  return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()
