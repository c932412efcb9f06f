"""Parameter counts of model configs, without materialising them.

    python -m lcjax.models.report configs/models/*.gin
"""

import os
import sys

import gin
import jax
from flax import nnx

from lcjax.models.config import ModelConfig
from lcjax.models.lm import LM
from lcjax.models.pattern import MIXERS


def model_config(gin_file: str) -> ModelConfig:
  """The ModelConfig a gin file describes (gin state is cleared before and after)."""
  import lcjax.models.allocation  # noqa: F401  (gin must know hybrid_pattern)
  from lcjax.config import parse_gin

  gin.clear_config()
  try:
    parse_gin([gin_file], [])
    return ModelConfig()
  finally:
    gin.clear_config()


def _param_count(make) -> int:
  """Parameters of the module `make()` builds, from shapes only (`nnx.eval_shape`)."""
  abstract = nnx.eval_shape(make)
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def counted_params(cfg: ModelConfig) -> int:
  """Parameters of the whole model's module tree."""
  return _param_count(lambda: LM(cfg, rngs=nnx.Rngs(0)))


def mixer_params(cfg: ModelConfig, symbol: str) -> int:
  """Parameters of one mixer of pattern symbol `symbol`, built from its registry entry
  (without its block's pre-norm)."""
  mixer = MIXERS[symbol]
  return _param_count(lambda: mixer.module(cfg.mixer_config(symbol), cfg.wide,
                                           rngs=nnx.Rngs(0)))


def main(paths: list[str]) -> None:
  print("| config | blocks (M / * / -) | d_model | vocab | parameters |")
  print("|---|---|---:|---:|---:|")
  for path in paths:
    cfg = model_config(path)
    n = counted_params(cfg)
    counts = " / ".join(str(cfg.pattern.count(s)) for s in "M*-")
    print(f"| {os.path.basename(path)} | {len(cfg.pattern)} ({counts}) | {cfg.d_model} "
          f"| {cfg.vocab_size} | {n / 1e6:,.1f}M |")


if __name__ == "__main__":
  main(sys.argv[1:])
