"""Comparing two trees of arrays by path, shape and dtype, for messages that name what differs
(a checkpoint against the configured state, one stage's parameters against another's)."""

import jax
import numpy as np


def array_differences(saved, abstract_state, was: str = "the checkpoint", now: str = "the model",
                      change: str = "checkpoint -> now") -> list[str]:
  """What differs between `saved` (orbax tree metadata, or any tree of arrays) and
  `abstract_state` (`was` and `now` name them, `change` the direction), one line per kind
  (missing, unexpected, changed shape or dtype), each naming the first few paths (parameters
  before the optimizer state) and counting the rest."""
  have, want = _shapes(getattr(saved, "tree", saved)), _shapes(abstract_state)
  paths = sorted(have.keys() | want.keys(), key=lambda p: (not p.startswith("params"), p))
  kinds = {
      f"not in {was}": [f"{p} {_describe(want[p])}" for p in paths if p not in have],
      f"in {was}, not in {now}": [f"{p} {_describe(have[p])}" for p in paths if p not in want],
      f"changed ({change})": [
          f"{p} {_describe(have[p])} -> {_describe(want[p])}"
          for p in paths if p in have and p in want and have[p] != want[p]],
  }
  return [f"{len(found)} {kind}: {'; '.join(first(found, 3))}"
          for kind, found in kinds.items() if found]


def _shapes(tree) -> dict[str, tuple[tuple, str]]:
  """{dotted path: (shape, dtype name)} of the array leaves of `tree`."""
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
  return {".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                   for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
          for path, leaf in leaves}


def _describe(shape_dtype: tuple) -> str:
  shape, dtype = shape_dtype
  return f"{dtype}{list(shape)}"


def first(items: list[str], shown: int = 5) -> list[str]:
  """The first `shown` of `items`, then "and N more"."""
  return items[:shown] + ([f"and {len(items) - shown} more"] if len(items) > shown else [])
