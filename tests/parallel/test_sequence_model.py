"""A whole hybrid model with its rows split over the `sequence` mesh axis (ring / all-gather
attention, sequence-sharded Mamba-2, every layout) against the same model on one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lcjax.models.attention import AttentionConfig
from lcjax.models.config import ModelConfig
from lcjax.models.lm import LM
from lcjax.models.mamba import MambaConfig
from lcjax.models.mlp import MLPConfig
from lcjax.parallel import sharding
from lcjax.parallel.layout import permute_batch
from lcjax.parallel.mesh import MeshConfig, make_mesh
from lcjax.parallel.sequence import SequenceConfig, SequenceSharding
from tests.numerics import positions_of, random_segments
from tests.train.runs import bindings, train_in_process, train_losses

CFG = ModelConfig(vocab_size=64, d_model=32, pattern="M*-M*-",
                  attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, block_q=8,
                                            block_kv=8),
                  mlp=MLPConfig(hidden_dim=64),
                  mamba=MambaConfig(d_state=8, headdim=16, ngroups=2, chunk_size=8),
                  init_std=0.1, dtype="float32")
SEQ = 64


def loss_and_grads(graphdef, params, batch):
  def loss(params):
    logits = nnx.merge(graphdef, params)(batch["inputs"], batch["segment_ids"],
                                         batch["positions"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).sum()
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("mesh_axes,layout,attention", [
    (dict(sequence=8), "zigzag", "ring"),
    (dict(sequence=8), "contiguous", "allgather"),
    (dict(data=2, sequence=4), "striped", "ring"),
    (dict(fsdp=2, sequence=4), "zigzag", "allgather"),
    (dict(tensor=2, sequence=4), "contiguous", "ring"),
])
def test_sequence_sharded_hybrid_matches_one_device(rng, mesh_axes, layout, attention):
  cfg = dataclasses.replace(CFG, attention=dataclasses.replace(
      CFG.attention, window=20, sinks=2)) if layout == "striped" else CFG
  shard_edges = np.arange(SEQ // 8, SEQ, SEQ // 8)
  segment_ids = random_segments(rng, 2, SEQ, max_docs=4, edges=shard_edges)
  batch = {"inputs": rng.integers(0, cfg.vocab_size, (2, SEQ)).astype(np.int32),
           "targets": rng.integers(0, cfg.vocab_size, (2, SEQ)).astype(np.int32),
           "segment_ids": segment_ids, "positions": positions_of(segment_ids)}
  model = LM(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  graphdef, params = nnx.split(model)
  want_loss, want_grads = loss_and_grads(graphdef, params, batch)

  mesh = make_mesh(MeshConfig(**{"data": 1, **mesh_axes}))
  seq = SequenceSharding.create(mesh, sharding.DEFAULT_RULES,
                                SequenceConfig(layout=layout, attention=attention))
  sharded_graphdef, _ = nnx.split(LM(cfg, rngs=nnx.Rngs(0), sequence=seq))
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, sharding.DEFAULT_RULES))
  sharded_batch = {k: put(v) for k, v in permute_batch(batch, layout, seq.shards).items()}
  loss, grads = loss_and_grads(sharded_graphdef, params, sharded_batch)

  # float32: the sharded path sums in another order (blockwise softmax, states across shards).
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    want = dict(jax.tree_util.tree_leaves_with_path(want_grads))[path]
    scale = max(float(jnp.abs(want).max()), 1e-6)
    np.testing.assert_allclose(g / scale, want / scale, atol=2e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_no_sequence_axis_means_no_sequence_sharding():
  mesh = make_mesh(MeshConfig(data=2, fsdp=4))
  assert SequenceSharding.create(mesh, sharding.DEFAULT_RULES, SequenceConfig()) is None


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_whole_row_attention_impl_fails_at_build(impl):
  mesh = make_mesh(MeshConfig(data=1, sequence=8))
  seq = SequenceSharding.create(mesh, sharding.DEFAULT_RULES, SequenceConfig())
  cfg = dataclasses.replace(CFG, attention=dataclasses.replace(CFG.attention, impl=impl))
  with pytest.raises(ValueError, match=f"AttentionConfig.impl='{impl}'.*'blockwise', 'pallas'"):
    nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0), sequence=seq))
  for ok in ("auto", "blockwise", "pallas"):  # "auto" is blockwise there
    cfg = dataclasses.replace(CFG, attention=dataclasses.replace(CFG.attention, impl=ok))
    nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0), sequence=seq))


def test_bad_sequence_config_names_the_fix():
  with pytest.raises(ValueError, match="layout='diagonal'"):
    SequenceConfig(layout="diagonal")
  with pytest.raises(ValueError, match="attention='flash'"):
    SequenceConfig(attention="flash")


HYBRID = ["ModelConfig.pattern = 'M*-'", "MambaConfig.d_state = 8",
          "MambaConfig.headdim = 16", "MambaConfig.chunk_size = 16",
          "AttentionConfig.block_q = 16", "AttentionConfig.block_kv = 16"]


@pytest.mark.slow
def test_training_with_sequence_sharding_matches_one_device(tmp_path, monkeypatch):
  """Several optimizer steps of a tiny hybrid through the real loop: 8 sequence shards (zigzag,
  ring) and data 2 x sequence 4 (striped, all-gather) against one device."""
  common = bindings(TrainConfig__steps=4, TrainConfig__eval_every=4,
                    TrainConfig__checkpoint_every=1000) + HYBRID
  runs = {
      "seq8": ["MeshConfig.data = 1", "MeshConfig.sequence = 8",
               "SequenceConfig.layout = 'zigzag'"],
      "data2_seq4": ["MeshConfig.data = 2", "MeshConfig.sequence = 4",
                     "SequenceConfig.layout = 'striped'", "SequenceConfig.attention = 'allgather'"],
  }
  summaries = {name: train_in_process(tmp_path / name, common + extra)
               for name, extra in runs.items()}
  devices = jax.devices()
  monkeypatch.setattr("lcjax.parallel.mesh.jax.devices", lambda: devices[:1])
  one = train_in_process(tmp_path / "one", common + ["MeshConfig.data = 1"])
  want = train_losses(tmp_path / "one")
  for name in runs:
    got = train_losses(tmp_path / name)
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)],
                               rtol=2e-5, err_msg=name)
    # Eval sees the outputs back in the original order: the same metrics.
    for key, value in one["eval"].items():
      np.testing.assert_allclose(summaries[name]["eval"][key], value, rtol=2e-5, err_msg=key)
