"""The MLP ("-" in a layer pattern), its config and its FLOPs.

Gated (SwiGLU, GeGLU):  down(act(gate(x)) * up(x))   Llama, Mistral, Qwen2
Plain:                  down(act(up(x)))             GPT-2 (gelu), NemotronH (relu2)
"""

import dataclasses
import functools

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.config import check_positive, check_types
from lcjax.errors import ConfigError
from lcjax.kernels.ops import LOCAL
from lcjax.models.layers import ModelWide, normal_param

# Named as in transformers' ACT2FN, so a checkpoint's `hidden_act` is the name here.
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),  # Primer's squared ReLU
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MLPConfig:
  """hidden_dim: the width of the up (and gate) projection.
  activation: a name in `ACTIVATIONS`; gated: multiply act(gate(x)) by up(x) (SwiGLU with
  "silu"), else down(act(up(x))) with no gate parameter."""
  hidden_dim: int = 384
  activation: str = "silu"
  gated: bool = True

  def __post_init__(self):
    check_types(self)
    check_positive(self, ("hidden_dim",))
    if self.activation not in ACTIVATIONS:
      raise ConfigError(f"MLPConfig.activation={self.activation!r} is not one of "
                        f"{tuple(ACTIVATIONS)}.")


def mlp_flops(cfg: MLPConfig, d_model: int, seq_len: int) -> float:
  """Forward matmul FLOPs per token: (gate,) up, down."""
  del seq_len
  return 2 * (3 if cfg.gated else 2) * d_model * cfg.hidden_dim


class MLP(nnx.Module):
  """A mixer, so it takes and ignores the extras."""

  def __init__(self, cfg: MLPConfig, wide: ModelWide, *, rngs: nnx.Rngs, ops=LOCAL):
    del ops  # per token: a split sequence changes nothing
    d, f = wide.d_model, cfg.hidden_dim
    if cfg.gated:
      self.gate = normal_param(rngs, (d, f), wide.init_std, ("embed", "mlp"))
    self.up = normal_param(rngs, (d, f), wide.init_std, ("embed", "mlp"))
    self.down = normal_param(rngs, (f, d), wide.output_init_std, ("mlp", "embed"))
    self.activation = cfg.activation
    self.gated = cfg.gated

  def __call__(self, x: jax.Array, *, segment_ids=None, positions=None) -> jax.Array:
    """`[batch, seq, embed]` -> same shape and dtype."""
    del segment_ids, positions
    dt = x.dtype
    act = ACTIVATIONS[self.activation]
    up = x @ self.up[...].astype(dt)
    h = act(x @ self.gate[...].astype(dt)) * up if self.gated else act(up)
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
