"""How an lcjax parameter is stored in a Hugging Face checkpoint: a `Piece` of one HF tensor.

An HF tensor holds one lcjax parameter or several: whole (a norm's weight), transposed
(`nn.Linear.weight` is `[out, in]`, lcjax's matrices `[in, out]`), with heads split out
(`q_proj.weight` `[heads * head_dim, d]` is lcjax's `q` `[d, heads, head_dim]`), or as a range of
its rows (Mamba-2's fused `in_proj`, its depthwise `conv1d`). A Piece says which rows and how
they become the lcjax array:

    lcjax = hf[start:stop].reshape(split).transpose(perm)
    hf[start:stop] = lcjax.transpose(argsort(perm)).reshape(shape)

Both directions are exact (reshapes and transposes only); dtypes are the caller's business.
An `Architecture` is a config.json mapping plus the Piece of every lcjax parameter.
"""

import dataclasses
from collections.abc import Callable

import numpy as np

from lcjax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Piece:
  """name: the HF tensor; rows: (start, stop) of its first axis, None for all of it;
  split: the shape the rows are reshaped to first (None: as they are); perm: the transpose
  after that (None: none); shape: hf[start:stop]'s shape, needed only with a split."""
  name: str
  rows: tuple[int, int] | None = None
  split: tuple[int, ...] | None = None
  perm: tuple[int, ...] | None = None
  shape: tuple[int, ...] | None = None

  def to_lcjax(self, rows: np.ndarray) -> np.ndarray:
    """hf[start:stop] -> the lcjax parameter."""
    x = rows if self.split is None else rows.reshape(self.split)
    return x if self.perm is None else x.transpose(self.perm)

  def to_hf(self, value: np.ndarray) -> np.ndarray:
    """The lcjax parameter -> hf[start:stop]."""
    x = value if self.perm is None else value.transpose(np.argsort(self.perm))
    return x if self.shape is None else x.reshape(self.shape)


def linear(name: str, rows: tuple[int, int] | None = None) -> Piece:
  """nn.Linear's `[out, in]` weight (or rows of it) as an lcjax `[in, out]` matrix."""
  return Piece(name, rows, perm=(1, 0))


def heads_in(name: str, d_model: int, heads: int, head_dim: int) -> Piece:
  """q/k/v_proj.weight `[heads * head_dim, d]` as lcjax's `[d, heads, head_dim]`."""
  return Piece(name, split=(heads, head_dim, d_model), perm=(2, 0, 1),
               shape=(heads * head_dim, d_model))


def heads_out(name: str, d_model: int, heads: int, head_dim: int) -> Piece:
  """o_proj.weight `[d, heads * head_dim]` as lcjax's `[heads, head_dim, d]`."""
  return Piece(name, split=(d_model, heads, head_dim), perm=(1, 2, 0),
               shape=(d_model, heads * head_dim))


def heads_bias(name: str, heads: int, head_dim: int) -> Piece:
  """q/k/v_proj.bias `[heads * head_dim]` as lcjax's `[heads, head_dim]`."""
  return Piece(name, split=(heads, head_dim), shape=(heads * head_dim,))


def conv(name: str, rows: tuple[int, int], width: int) -> Piece:
  """Channels [start, stop) of a depthwise nn.Conv1d weight `[channels, 1, width]` as lcjax's
  `[width, channels]`."""
  channels = rows[1] - rows[0]
  return Piece(name, rows, split=(channels, width), perm=(1, 0), shape=(channels, 1, width))


def by_tensor(pieces: dict[str, Piece]) -> dict[str, list[tuple[str, Piece]]]:
  """{lcjax path: Piece} -> {HF name: [(lcjax path, Piece), ...] in row order}: what an
  exporter assembles each HF tensor from."""
  grouped: dict[str, list[tuple[str, Piece]]] = {}
  for path, piece in pieces.items():
    grouped.setdefault(piece.name, []).append((path, piece))
  for parts in grouped.values():
    parts.sort(key=lambda part: (part[1].rows or (0, 0))[0])
  return grouped


@dataclasses.dataclass(frozen=True)
class Architecture:
  hf_class: str  # config.json "architectures"[0], e.g. "LlamaForCausalLM"
  model_config: Callable[[dict], ModelConfig]
  # ModelConfig -> config.json (a dict); ConvertError when the HF class cannot express it.
  hf_config: Callable[[ModelConfig], dict]
  # ModelConfig -> {lcjax parameter path ("blocks/0/mixer/q", `param_path`): Piece}.
  pieces: Callable[[ModelConfig], dict[str, Piece]]


def param_path(path: tuple) -> str:
  """An nnx state path ('blocks', 0, 'mixer', 'q') as "blocks/0/mixer/q"."""
  return "/".join(str(k) for k in path)
