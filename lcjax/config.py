"""gin parsing for the CLIs (with lcjax's shipped configs on the include path), and type
checks for the gin-configured dataclasses. Imports nothing of lcjax: every layer may use it.

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
  """
  for path in [*(os.path.dirname(os.path.abspath(f)) for f in files), configs_dir()]:
    gin.add_config_file_search_path(path)
  # gin logs "Path not found" for every search path it tries before the one that matches.
  logging.disable(logging.ERROR)
  try:
    gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
  except (ValueError, KeyError, SyntaxError, OSError) as e:
    raise ValueError(
        f"Bad gin configuration: {e}\n(files: {files}, bindings: {bindings}). Check the "
        "spelling of the configurable and parameter against the dataclasses in lcjax "
        "(e.g. ModelConfig, DataConfig, TrainConfig, OptimConfig, MeshConfig), and that the "
        "module defining it was imported before parsing.") from e
  finally:
    logging.disable(logging.NOTSET)


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
  """Raises TypeError naming `Class.field` when a field's value does not match its annotation."""
  hints = typing.get_type_hints(type(config))
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if not _matches(value, hints[field.name]):
      name = f"{type(config).__name__}.{field.name}"
      raise TypeError(
          f"{name} = {value!r} has type {type(value).__name__}, expected "
          f"{hints[field.name]}. Fix the gin binding '{name}'.")


def check_positive(config, names: tuple[str, ...]) -> None:
  """Raises ValueError naming `Class.field` for the first of `names` whose value is < 1."""
  for name in names:
    if getattr(config, name) < 1:
      raise ValueError(
          f"{type(config).__name__}.{name} must be >= 1, got {getattr(config, name)}.")


_BINDING_START = re.compile(r"^([A-Za-z_][\w./]*)\s*=\s*(.*)$")


def _operative_bindings(text: str) -> dict[str, str]:
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
  before, after = _operative_bindings(old), _operative_bindings(new)
  changes = []
  for name in sorted(before.keys() | after.keys()):
    if name not in after:
      changes.append(f"removed {name} = {before[name]}")
    elif name not in before:
      changes.append(f"added {name} = {after[name]}")
    elif before[name] != after[name]:
      changes.append(f"{name}: {before[name]} -> {after[name]}")
  return changes
