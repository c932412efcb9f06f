"""Mesh construction and logical-axis shardings on 8 fake CPU devices."""

import jax
import optax
import pytest
from jax.sharding import PartitionSpec as P

from lcjax.models.attention import AttentionConfig
from lcjax.models.config import ModelConfig
from lcjax.models.mamba import MambaConfig
from lcjax.models.mlp import MLPConfig
from lcjax.parallel import sharding
from lcjax.parallel.mesh import MeshConfig, make_mesh
from lcjax.train import state as train_state


def test_minus_one_takes_the_remaining_devices():
  assert MeshConfig(data=-1, fsdp=4).shape(8) == {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_rules_shard_params_and_optimizer_moments_alike():
  mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
  attention = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16)
  cfg = ModelConfig(d_model=64, attention=attention, mlp=MLPConfig(hidden_dim=128),
                    tie_embeddings=False)
  _, params = train_state.model_skeleton(cfg)
  optimizer = optax.adam(1e-3)
  sh = train_state.state_shardings(params, optimizer, mesh, sharding.DEFAULT_RULES)
  specs = {jax.tree_util.keystr(p): s.spec
           for p, s in jax.tree_util.tree_leaves_with_path(sh["params"])}
  # Every matrix is split over fsdp on its embed dimension and over tensor on heads / mlp.
  for name, spec in specs.items():
    if "norm" in name:
      assert spec == P(None), name
  assert P("fsdp", "tensor") in specs.values()            # MLP gate/up: [embed, mlp]
  assert P("fsdp", "tensor", None) in specs.values()      # q: [embed, heads, head_dim]
  mu = optax.tree_map_params(optimizer, lambda s: s, sh["opt_state"],
                             transform_non_params=lambda _: None)
  assert jax.tree.leaves(mu[0].mu) == jax.tree.leaves(sh["params"])


def test_batch_sharding_spans_data_and_fsdp():
  mesh = make_mesh(MeshConfig(data=2, fsdp=4))
  assert sharding.batch_sharding(mesh, sharding.DEFAULT_RULES).spec == P(("data", "fsdp"), "sequence")
  with pytest.raises(ValueError, match="Sequence length 102 is not divisible"):
    sharding.check_batch(8, 102, make_mesh(MeshConfig(data=2, sequence=4)), sharding.DEFAULT_RULES)


def test_describe_prints_rules_and_per_device_shapes():
  from lcjax.train.state import model_skeleton
  _, params = model_skeleton(ModelConfig(pattern="M*-", mamba=MambaConfig(headdim=32, d_state=16)))
  mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
  text = sharding.describe(params, mesh, sharding.DEFAULT_RULES)
  assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 4, 'sequence': 1}" in text
  # embed (128) over fsdp=2, heads (4) over tensor=4; block numbers folded into one kind.
  assert "blocks.*.mixer.q: ('embed', 'heads', 'head_dim'), (128, 4, 32) -> (64, 1, 32)" in text
  assert "blocks.*.mixer.in_x: ('embed', 'ssm_inner'), (128, 256) -> (64, 64)" in text
