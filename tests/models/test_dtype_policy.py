"""The compute dtype policy: "auto" is float32 on CPU (bfloat16 on GPU/TPU), params float32."""

import jax
import jax.numpy as jnp
from flax import nnx

from lcjax.models.config import ModelConfig
from lcjax.models.lm import LM


def test_auto_dtype_resolves_by_backend():
  assert jax.default_backend() == "cpu"
  assert ModelConfig(dtype="auto").compute_dtype == jnp.float32
  assert ModelConfig(dtype="bfloat16").compute_dtype == jnp.bfloat16


def test_params_stay_float32_whatever_the_compute_dtype():
  model = LM(ModelConfig(dtype="bfloat16", pattern="*-"), rngs=nnx.Rngs(0))
  dtypes = {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.float32)}
