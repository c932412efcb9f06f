"""lcjax parameters from Hugging Face tensors and back, one tensor at a time.

Importing fills each parameter from its `Piece` straight into its target sharding
(`jax.make_array_from_callback`): the host holds one HF tensor (as float32) at a time, never
the model. Exporting gathers one HF tensor at a time from its pieces.
"""

import functools
from collections.abc import Callable, Iterator

import jax
import numpy as np
from flax import nnx

from lcjax.convert.pieces import Piece, by_tensor, param_path
from lcjax.errors import ConvertError
from lcjax.models.config import ModelConfig
from lcjax.train.state import model_skeleton

# read(name, rows) -> hf[start:stop] (rows None: the whole tensor) as a numpy array.
Reader = Callable[[str, tuple[int, int] | None], np.ndarray]


def _flat(tree: dict, prefix=()) -> dict[tuple, object]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _nest(flat: dict[tuple, object]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


@functools.lru_cache(maxsize=2)
def abstract_params(cfg: ModelConfig) -> nnx.State:
  """The parameters' shapes and logical axes, nothing allocated; cached, since an import
  needs them for the checks, the shardings and the reads."""
  return model_skeleton(cfg)[1]


def check_pieces(cfg: ModelConfig, pieces: dict[str, Piece], hf_class: str) -> None:
  """ConvertError unless `pieces` names exactly the model's parameters."""
  abstract = abstract_params(cfg)
  paths = {param_path(p) for p in _flat(nnx.to_pure_dict(abstract))}
  missing, extra = sorted(paths - set(pieces)), sorted(set(pieces) - paths)
  if missing or extra:
    raise ConvertError(f"{hf_class}: the converter's tensor map does not fit the model "
                       f"(unmapped parameters {missing}, unknown ones {extra}): a bug in "
                       f"lcjax.convert.")


def from_hf(cfg: ModelConfig, pieces: dict[str, Piece], read: Reader,
            shardings: dict | None = None) -> dict:
  """The lcjax params (a pure dict, float32, as the train state holds them) read through
  `read`, each placed with its sharding from `shardings` (a pure dict like the params, e.g.
  `lcjax.parallel.sharding.param_shardings`; None: the default device). ConvertError naming
  the tensor when a shape does not fit."""
  abstract = abstract_params(cfg)
  targets = _flat(nnx.to_pure_dict(abstract))
  placements = _flat(shardings) if shardings is not None else {}
  params = {}
  for path, target in targets.items():
    piece = pieces[param_path(path)]
    rows = read(piece.name, piece.rows)
    try:
      value = piece.to_lcjax(rows)
    except ValueError:  # a reshape that does not fit
      value = None
    if value is None or value.shape != tuple(target.shape):
      where = "" if piece.rows is None else f" rows {piece.rows[0]}:{piece.rows[1]} of"
      raise ConvertError(
          f"Tensor {piece.name!r}:{where} shape {tuple(rows.shape)} does not give lcjax's "
          f"{param_path(path)} of shape {tuple(target.shape)}; nothing was written. The "
          f"checkpoint's weights do not match its config.json.")
    value = np.asarray(value, np.float32)
    sharding = placements.get(path)
    if sharding is None:
      params[path] = jax.device_put(value)
    else:
      params[path] = jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])
  return _nest(params)


def to_hf(pieces: dict[str, Piece], params: dict) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, float32 tensor) for every HF tensor, each gathered from its pieces of `params`
  (a pure dict of arrays, sharded or not) when it is reached."""
  flat = {param_path(p): v for p, v in _flat(params).items()}
  for name, parts in by_tensor(pieces).items():
    rows = [piece.to_hf(np.asarray(jax.device_get(flat[path]), np.float32))
            for path, piece in parts]
    yield name, rows[0] if len(rows) == 1 else np.concatenate(rows, axis=0)
