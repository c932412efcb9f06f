"""The SwiGLU MLP ("-" in a layer pattern), its config and its FLOPs."""

import dataclasses

import gin
import jax
from flax import nnx

from lcjax.config import check_positive, check_types
from lcjax.kernels.ops import LOCAL
from lcjax.models.layers import ModelWide, normal_param


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MLPConfig:
  """hidden_dim: the width of the gate and up projections."""
  hidden_dim: int = 384

  def __post_init__(self):
    check_types(self)
    check_positive(self, ("hidden_dim",))


def mlp_flops(cfg: MLPConfig, d_model: int, seq_len: int) -> float:
  """Forward matmul FLOPs per token: gate, up, down."""
  del seq_len
  return 2 * 3 * d_model * cfg.hidden_dim


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)). A mixer, so it takes and ignores the extras."""

  def __init__(self, cfg: MLPConfig, wide: ModelWide, *, rngs: nnx.Rngs, ops=LOCAL):
    del ops  # per token: a split sequence changes nothing
    d, f = wide.d_model, cfg.hidden_dim
    self.gate = normal_param(rngs, (d, f), wide.init_std, ("embed", "mlp"))
    self.up = normal_param(rngs, (d, f), wide.init_std, ("embed", "mlp"))
    self.down = normal_param(rngs, (f, d), wide.output_init_std, ("mlp", "embed"))

  def __call__(self, x: jax.Array, *, segment_ids=None, positions=None) -> jax.Array:
    """`[batch, seq, embed]` -> same shape and dtype."""
    del segment_ids, positions
    dt = x.dtype
    h = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
    return h @ self.down[...].astype(dt)

  # Decoding: stateless, so the cache is None (the interface of Attention and Mamba2).

  def init_cache(self, batch: int, max_len: int | None = None) -> None:
    del batch, max_len

  def prefill(self, x: jax.Array, cache=None, *, segment_ids=None,
              positions=None) -> tuple[jax.Array, None]:
    del cache, segment_ids, positions
    return self(x), None

  def step(self, x: jax.Array, cache=None) -> tuple[jax.Array, None]:
    """`[batch, embed]` -> `[batch, embed]`."""
    del cache
    return self(x), None
