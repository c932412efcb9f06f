"""Hugging Face safetensors checkpoints, read one tensor (or rows of one) at a time and written
one shard at a time, as transformers' `save_pretrained` lays them out:

    model.safetensors                                   (one file), or
    model-00001-of-0000N.safetensors ... + model.safetensors.index.json
        {"metadata": {"total_size": bytes}, "weight_map": {tensor: shard file}}

Pickled checkpoints (`pytorch_model.bin`, `.pt`, ...) are refused, never unpickled: loading a
pickle runs arbitrary code.
"""

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lcjax.errors import ConvertError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # transformers' save_pretrained default, "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _refuse_pickle(path: str) -> None:
  raise ConvertError(
      f"{path} is a pickled PyTorch checkpoint; lcjax reads only safetensors and never "
      "unpickles (loading a pickle runs arbitrary code). Convert it first, on a machine with "
      "torch and transformers: `AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT)` "
      "writes OUT/model.safetensors; then import OUT.")


def checkpoint_files(path: str) -> tuple[list[str], dict[str, str] | None]:
  """(the .safetensors files, the index's weight_map or None) of a HF directory or one
  .safetensors file. ConvertError for a pickle, or a directory with no safetensors."""
  if os.path.isfile(path):
    if path.endswith(PICKLES):
      _refuse_pickle(path)
    if not path.endswith(".safetensors"):
      raise ConvertError(f"{path} is not a .safetensors file: give a Hugging Face model "
                         "directory or its model.safetensors.")
    return [path], None
  if not os.path.isdir(path):
    raise ConvertError(f"{path} does not exist: give a Hugging Face model directory (with "
                       "config.json and model.safetensors) or a .safetensors file.")
  index = os.path.join(path, INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return [os.path.join(path, s) for s in sorted(set(weight_map.values()))], weight_map
  if os.path.isfile(os.path.join(path, SINGLE)):
    return [os.path.join(path, SINGLE)], None
  pickles = sorted(f for f in os.listdir(path) if f.endswith(PICKLES))
  if pickles:
    _refuse_pickle(os.path.join(path, pickles[0]))
  raise ConvertError(f"{path} holds neither {SINGLE} nor {INDEX}: nothing to import.")


def _host_device():
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu: the default device, one tensor at a time
    return None


class SafetensorsReader:
  """The tensors of a HF checkpoint (`checkpoint_files`): names and shapes without reading
  data, and `read(name, rows)` reading only those rows. Use as a context manager."""

  def __init__(self, path: str):
    files, weight_map = checkpoint_files(path)
    self._handles = {f: safe_open(f, framework="numpy") for f in files}
    self._bf16_handles = {}  # file -> its flax handle, opened at the first bfloat16 read
    self._file: dict[str, str] = {}
    for f, handle in self._handles.items():
      for name in handle.keys():
        self._file[name] = f
    if weight_map is not None:
      missing = sorted(n for n in weight_map if n not in self._file)
      if missing:
        raise ConvertError(f"{INDEX} in {path} lists tensors no shard holds: "
                           f"{missing[:5]}; the download is incomplete.")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._handles.clear()
    self._bf16_handles.clear()

  def shapes(self) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape}, from the headers only."""
    return {n: tuple(self._slice(n).get_shape()) for n in self._file}

  def _slice(self, name: str):
    if name not in self._file:
      raise ConvertError(f"Tensor {name!r} is missing from the checkpoint (it has "
                         f"{len(self._file)} tensors); nothing was written. The checkpoint does "
                         "not match its config.json.")
    return self._handles[self._file[name]].get_slice(name)

  def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
    """hf[start:stop] (rows None: all of it), reading only those bytes; bfloat16 as
    ml_dtypes.bfloat16."""
    part = self._slice(name)
    index = slice(None) if rows is None else slice(*rows)
    if part.get_dtype() != "BF16":
      return part[index]
    # safetensors' numpy slices do not know bfloat16; its flax ones do (kept on the host when
    # JAX has its CPU backend).
    file = self._file[name]
    if file not in self._bf16_handles:
      self._bf16_handles[file] = safe_open(file, framework="flax")
    with jax.default_device(_host_device()):
      return np.asarray(self._bf16_handles[file].get_slice(name)[index])

  def check_used(self, used: Iterable[str]) -> None:
    """ConvertError naming the checkpoint's tensors not in `used`, and `used` ones missing."""
    used = set(used)
    missing = sorted(used - set(self._file))
    if missing:
      self._slice(missing[0])
    unused = sorted(set(self._file) - used)
    if unused:
      raise ConvertError(
          f"The checkpoint holds {len(unused)} tensor(s) the converter does not map: "
          f"{unused[:8]}{' ...' if len(unused) > 8 else ''}; nothing was written. Ignoring them "
          "would import a different model: the config.json does not describe these weights.")


def parse_size(size: int | str) -> int:
  """Bytes from an int or a string such as "5GB", "500MB", "2GiB" (transformers' units)."""
  if isinstance(size, int):
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", size.upper())
  size_bytes = 0 if match is None else int(float(match.group(1)) * _UNITS[match.group(2) or ""])
  if size_bytes <= 0:
    raise ConvertError(f"max_shard_size={size!r} is not a size: give bytes or e.g. '5GB', "
                       "'500MB', '2GiB'.")
  return size_bytes


class _ShardWriter:
  """Fills one shard at a time (at most `max_bytes` of tensor data unless a tensor alone is
  larger) into `tmp/shard-<i>`; `finish` names them as transformers does."""

  def __init__(self, tmp: str, max_bytes: int):
    self.tmp, self.max_bytes = tmp, max_bytes
    self.current: dict[str, np.ndarray] = {}
    self.current_bytes = 0
    self.shards: list[list[str]] = []
    self.total = 0

  def add(self, name: str, tensor: np.ndarray) -> None:
    if self.current and self.current_bytes + tensor.nbytes > self.max_bytes:
      self.flush()
    self.current[name] = np.ascontiguousarray(tensor)
    self.current_bytes += tensor.nbytes
    self.total += tensor.nbytes

  def flush(self) -> None:
    if self.current:
      save_file(self.current, os.path.join(self.tmp, f"shard-{len(self.shards)}"),
                metadata={"format": "pt"})  # transformers refuses files without "format"
      self.shards.append(list(self.current))
      self.current, self.current_bytes = {}, 0

  def finish(self) -> None:
    self.flush()
    n = len(self.shards)
    names = ([SINGLE] if n == 1 else
             [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    for i, name in enumerate(names):
      os.rename(os.path.join(self.tmp, f"shard-{i}"), os.path.join(self.tmp, name))
    if n > 1:
      weight_map = {t: name for name, tensors in zip(names, self.shards) for t in tensors}
      with open(os.path.join(self.tmp, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f,
                  indent=2, sort_keys=True)


def write_checkpoint(out: str, tensors: Iterable[tuple[str, np.ndarray]],
                     extra_files: dict[str, str | bytes] | None = None,
                     max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[str]:
  """Writes `tensors` (consumed one at a time; the host holds at most one shard) and
  `extra_files` ({file name: text or bytes}, e.g. config.json) to the new directory `out`,
  atomically: everything goes to a temporary directory beside it, renamed to `out` at the
  end, so a failure (a full disk) leaves no partial export. Returns the file names written."""
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ConvertError(f"{out} exists and is not an empty directory; nothing was written. "
                       "Export to a new directory (no overwriting).")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  try:
    writer = _ShardWriter(tmp, parse_size(max_shard_size))
    for name, tensor in tensors:
      writer.add(name, tensor)
    writer.finish()
    for name, content in (extra_files or {}).items():
      with open(os.path.join(tmp, name), "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
    if os.path.isdir(out):
      os.rmdir(out)  # empty, checked above
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return sorted(os.listdir(out))
