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


def model_config(gin_file: str) -> ModelConfig:
  """The ModelConfig a gin file describes (gin state is cleared before and after)."""
  from lcjax.config import parse_gin

  gin.clear_config()
  try:
    parse_gin([gin_file], [])
    return ModelConfig()
  finally:
    gin.clear_config()


def counted_params(cfg: ModelConfig) -> int:
  """Parameters of the real module tree, from shapes only (`nnx.eval_shape`)."""
  abstract = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


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
