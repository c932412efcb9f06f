"""gin parsing for the CLIs (with lcjax's shipped configs on the include path), and type
checks for the gin-configured dataclasses. Imports only lcjax.errors: every layer may use it.

gin already rejects unknown configurables and parameters at parse time; it does not check
value types, so every config dataclass calls `check_types` in `__post_init__`: a wrong type
fails before anything compiles, naming the binding to fix.
"""

import dataclasses
import importlib.util
import logging
import os
import re
import types
import typing

import gin

from lcjax.errors import ConfigError, ConfigTypeError


def configs_dir() -> str:
  """The gin configs shipped with lcjax: an installed copy's package data `lcjax.configs`, else
  (a source checkout or an editable install, whose finder does not resolve that data-only
  package) the repository's configs/ beside the package."""
  spec = importlib.util.find_spec("lcjax.configs")  # a namespace package: data, no code
  if spec is not None and spec.submodule_search_locations:
    return list(spec.submodule_search_locations)[0]
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def parse_gin(files: list[str], bindings: list[str]) -> None:
  """Loads gin files then bindings (later ones override earlier ones).

  `include` lines resolve against each file's directory and lcjax's shipped configs. gin knows
  a configurable only once its module is imported: callers (the CLIs) import those first.
  Raises ConfigError naming a missing file (given or included) or the bad binding.
  """
  search = list(dict.fromkeys([*(os.path.dirname(os.path.abspath(f)) for f in files),
                               configs_dir()]))
  for path in search:
    gin.add_config_file_search_path(path)
  # gin is handed absolute paths: its fallback reader fails with a TypeError on a missing file
  # whose directory is a namespace package (e.g. configs/ in the repository root).
  resolved = [_find_gin_file(f, search, None) for f in files]
  for path in resolved:
    _check_includes(path, search, seen=set())
  # gin logs "Path not found" for every search path it tries before the one that matches.
  logging.disable(logging.ERROR)
  try:
    gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=False)
  except (ValueError, KeyError, SyntaxError, OSError, TypeError) as e:
    raise ConfigError(
        f"Bad gin configuration: {e} (files: {files}, bindings: {bindings}). Check the "
        "spelling of the configurable and parameter against the dataclasses in lcjax "
        "(e.g. ModelConfig, DataConfig, TrainConfig, OptimConfig, MeshConfig), and that the "
        "module defining it was imported before parsing.") from e
  finally:
    logging.disable(logging.NOTSET)


_INCLUDE = re.compile(r"""^\s*include\s+(['"])(.+?)\1""", re.MULTILINE)


def _find_gin_file(name: str, search: list[str], included_from: str | None) -> str:
  """The absolute path gin reads for `name` (as given, else under each search path)."""
  tried = list(dict.fromkeys(os.path.abspath(os.path.join(p, name)) for p in ["", *search]))
  found = next((path for path in tried if os.path.isfile(path)), None)
  if found is None:
    where = f"included from {included_from}" if included_from else "--gin_file"
    searched = "" if os.path.isabs(name) else (
        f" (a relative path resolves against the current directory {os.getcwd()} and the "
        f"search paths {search})")
    raise ConfigError(f"gin file {name!r} ({where}) not found. Tried {tried}{searched}. Fix "
                      "the path, or give an absolute one.")
  return found


def _check_includes(path: str, search: list[str], seen: set[str]) -> None:
  """Raises ConfigError naming the first `include`d file (at any depth) that is missing."""
  if path in seen:
    return
  seen.add(path)
  with open(path) as f:
    names = [m.group(2) for m in _INCLUDE.finditer(f.read())]
  for name in names:
    _check_includes(_find_gin_file(name, search, path), search, seen)


def _matches(value, hint) -> bool:
  origin = typing.get_origin(hint)
  if hint is typing.Any:
    return True
  if origin in (typing.Union, types.UnionType):
    return any(_matches(value, h) for h in typing.get_args(hint))
  if hint is type(None):
    return value is None
  if origin is tuple:
    args = typing.get_args(hint)
    if not isinstance(value, (tuple, list)):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(_matches(v, args[0]) for v in value)
    return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
  if hint is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, origin or hint)


def check_types(config) -> None:
  """Raises ConfigTypeError (a TypeError) naming `Class.field` when a field's value does not
  match its annotation."""
  hints = typing.get_type_hints(type(config))
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if not _matches(value, hints[field.name]):
      name = f"{type(config).__name__}.{field.name}"
      raise ConfigTypeError(
          f"{name} = {value!r} has type {type(value).__name__}, expected "
          f"{hints[field.name]}. Fix the gin binding '{name}'.")


def check_positive(config, names: tuple[str, ...]) -> None:
  """Raises ConfigError (a ValueError) naming `Class.field` for the first of `names` whose
  value is < 1."""
  for name in names:
    if getattr(config, name) < 1:
      raise ConfigError(
          f"{type(config).__name__}.{name} must be >= 1, got {getattr(config, name)}.")


_BINDING_START = re.compile(r"^([A-Za-z_][\w./]*)\s*=\s*(.*)$")


def operative_bindings(text: str) -> dict[str, str]:
  """{`Class.param` (or `scope/Class.param`, a macro): value} of an operative gin text.

  A binding starts at column 0; the lines after it that are not comments or blank (indented,
  after a trailing backslash, a closing bracket) continue its value. Values are compared with
  their whitespace collapsed, so gin's line wrapping does not count as a change."""
  found, name = {}, None
  for line in text.splitlines():
    start = _BINDING_START.match(line)
    if start:
      name = start.group(1)
      found[name] = [start.group(2)]
    elif name is not None and line.strip() and not line.startswith("#"):
      found[name].append(line)
  return {k: " ".join(" ".join(p.rstrip().removesuffix("\\") for p in v).split())
          for k, v in found.items()}


def binding_changes(old: str, new: str) -> list[str]:
  """What differs between two operative gin texts (`gin.operative_config_str()`), one line a
  binding in name order: "ModelConfig.d_model: 32 -> 64", "added X.y = v", "removed X.y = v"."""
  before, after = operative_bindings(old), operative_bindings(new)
  changes = []
  for name in sorted(before.keys() | after.keys()):
    if name not in after:
      changes.append(f"removed {name} = {before[name]}")
    elif name not in before:
      changes.append(f"added {name} = {after[name]}")
    elif before[name] != after[name]:
      changes.append(f"{name}: {before[name]} -> {after[name]}")
  return changes
