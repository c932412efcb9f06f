"""The MLP's activations, gated and plain, against their formulas (transformers' ACT2FN
names), and the attention biases' parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax.errors import ConfigError
from lcjax.models.attention import Attention, AttentionConfig
from lcjax.models.config import ModelConfig
from lcjax.models.mlp import MLP, MLPConfig, mlp_flops
from tests.numerics import F32, assert_close

FORMULAS = {
    "silu": lambda x: x / (1 + np.exp(-x)),
    "relu": lambda x: np.maximum(x, 0),
    "relu2": lambda x: np.maximum(x, 0) ** 2,
    "gelu": lambda x: 0.5 * x * (1 + np.vectorize(__import__("math").erf)(x / np.sqrt(2))),
    "gelu_pytorch_tanh": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi)
                                                          * (x + 0.044715 * x ** 3))),
}


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("activation", sorted(FORMULAS))
def test_mlp_matches_formula(rng, activation, gated):
  wide = ModelConfig(dtype="float32").wide
  mlp = MLP(MLPConfig(hidden_dim=48, activation=activation, gated=gated), wide,
            rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  assert hasattr(mlp, "gate") == gated
  x = rng.normal(size=(2, 5, wide.d_model)).astype(np.float32)
  up = x.astype(np.float64) @ np.asarray(mlp.up[...], np.float64)
  act = FORMULAS[activation]
  h = act(x.astype(np.float64) @ np.asarray(mlp.gate[...], np.float64)) * up if gated else act(up)
  want = h @ np.asarray(mlp.down[...], np.float64)
  assert_close(mlp(jnp.asarray(x)), want, F32, f"{activation} gated={gated}")


def test_mlp_flops_count_the_gate():
  cfg = MLPConfig(hidden_dim=10)
  assert mlp_flops(cfg, 4, 1) == 2 * 3 * 4 * 10
  assert mlp_flops(MLPConfig(hidden_dim=10, gated=False), 4, 1) == 2 * 2 * 4 * 10


def test_unknown_activation_and_bias_refused():
  with pytest.raises(ConfigError, match="swish"):
    MLPConfig(activation="swish")
  with pytest.raises(ConfigError, match="qk"):
    AttentionConfig(bias="qk")


@pytest.mark.parametrize("bias, names", [("none", []), ("qkv", ["q_bias", "k_bias", "v_bias"]),
                                         ("qkvo", ["q_bias", "k_bias", "v_bias", "o_bias"])])
def test_attention_bias_parameters(bias, names):
  wide = ModelConfig(dtype="float32").wide
  attn = Attention(AttentionConfig(bias=bias), wide, rngs=nnx.Rngs(0))
  have = [n for n in ("q_bias", "k_bias", "v_bias", "o_bias") if hasattr(attn, n)]
  assert have == names
  x = jnp.ones((1, 3, wide.d_model))
  seg, pos = jnp.ones((1, 3), jnp.int32), jnp.arange(3)[None]
  base = attn(x, segment_ids=seg, positions=pos)
  if bias == "qkvo":  # the output bias adds to every position
    attn.o_bias[...] = jnp.full((wide.d_model,), 0.25)
    assert_close(attn(x, segment_ids=seg, positions=pos), base + 0.25, F32, "o_bias")
  assert jax.tree.leaves(nnx.state(attn, nnx.Param))
