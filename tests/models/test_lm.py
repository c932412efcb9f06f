import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lcjax.models.attention import AttentionConfig
from lcjax.models.config import ModelConfig
from lcjax.models.lm import LM
from lcjax.models.loss import token_losses
from lcjax.models.mamba import MambaConfig
from lcjax.models.mlp import MLPConfig
from lcjax.models.report import counted_params, mixer_params
from lcjax.parallel import sharding
from lcjax.parallel.layout import permute_batch, unpermute
from lcjax.parallel.mesh import MeshConfig, make_mesh
from lcjax.parallel.sequence import SequenceConfig, SequenceSharding
from lcjax.train.step import make_train_step
from tests.numerics import F32, F32_GRAD, assert_close, positions_of, random_segments

# Smaller than the default so the whole file compiles in a few seconds.
SMALL = ModelConfig(vocab_size=64, d_model=32, pattern="*-*-",
                    attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8),
                    mlp=MLPConfig(hidden_dim=64))


def make(cfg=SMALL, seed=0):
  return LM(cfg, rngs=nnx.Rngs(seed))


def params(model):
  return jax.tree.leaves(nnx.state(model, nnx.Param))


@nnx.jit
def forward(model, inputs, segment_ids, positions):
  return model(inputs, segment_ids, positions)


def loss_fn(model, inputs, segment_ids, positions):
  logits = model(inputs, segment_ids, positions)
  targets = jnp.roll(inputs, -1, axis=1)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


loss_and_grads = nnx.jit(nnx.value_and_grad(loss_fn))


def batch(rng, batch=2, seq=16, vocab=SMALL.vocab_size):
  inputs = jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)
  return inputs, jnp.ones_like(inputs), jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32),
                                                         inputs.shape)


def test_logits_float32_with_bfloat16_compute(rng):
  model = make(dataclasses.replace(SMALL, dtype="bfloat16"))
  logits = forward(model, *batch(rng))
  assert logits.dtype == jnp.float32 and logits.shape == (2, 16, SMALL.vocab_size)
  assert all(p.dtype == jnp.float32 for p in params(model))
  assert np.isfinite(logits).all()


@pytest.mark.parametrize("position_encoding", ["rope", "none"])
def test_packed_row_equals_documents_run_alone(rng, position_encoding):
  model = make(dataclasses.replace(SMALL, attention=dataclasses.replace(
      SMALL.attention, position_encoding=position_encoding)))
  lengths = (5, 7)
  docs = [jnp.asarray(rng.integers(0, SMALL.vocab_size, (1, n)), jnp.int32) for n in lengths]
  pad = 4
  inputs = jnp.concatenate(docs + [jnp.zeros((1, pad), jnp.int32)], axis=1)
  segment_ids = jnp.asarray([[1] * 5 + [2] * 7 + [0] * pad], jnp.int32)
  positions = jnp.asarray([list(range(5)) + list(range(7)) + [0] * pad], jnp.int32)
  packed = forward(model, inputs, segment_ids, positions)

  start = 0
  for doc, n in zip(docs, lengths):
    alone = forward(model, doc, jnp.ones_like(doc), jnp.arange(n, dtype=jnp.int32)[None])
    np.testing.assert_allclose(packed[:, start:start + n], alone, atol=1e-5, rtol=1e-5)
    start += n


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_same_loss_and_grads(rng, remat):
  data = batch(rng)
  loss, grads = loss_and_grads(make(), *data)
  loss_r, grads_r = loss_and_grads(make(dataclasses.replace(SMALL, remat=remat)), *data)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads_r, grads)


@pytest.mark.parametrize("tie", [True, False])
def test_num_params(tie):
  cfg = dataclasses.replace(SMALL, tie_embeddings=tie)
  attention = 32 * (4 + 2 * 2) * 8 + 4 * 8 * 32  # q, k, v (2 kv heads); o
  mlp = 3 * 32 * 64  # gate, up, down
  by_hand = (64 * 32 * (1 if tie else 2)  # embedding (and the untied head)
             + 2 * (32 + attention) + 2 * (32 + mlp)  # blocks, each with its pre-norm
             + 32)  # final norm
  assert (mixer_params(cfg, "*"), mixer_params(cfg, "-")) == (attention, mlp)
  assert counted_params(cfg) == by_hand
  assert sum(p.size for p in params(LM(cfg, rngs=nnx.Rngs(0)))) == by_hand


@pytest.mark.parametrize("tie", [True, False])
def test_gradient_reaches_every_parameter(rng, tie):
  model = make(dataclasses.replace(SMALL, tie_embeddings=tie))
  _, grads = loss_and_grads(model, *batch(rng))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


def test_every_param_has_logical_axes():
  state = nnx.state(LM(dataclasses.replace(SMALL, tie_embeddings=False), rngs=nnx.Rngs(0)),
                    nnx.Param)
  for path, var in jax.tree_util.tree_leaves_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == var[...].ndim, jax.tree_util.keystr(path)


@pytest.mark.parametrize("config, overrides, message", [
    (AttentionConfig, dict(num_heads=4, num_kv_heads=3), "AttentionConfig.num_kv_heads"),
    (AttentionConfig, dict(head_dim=33), "AttentionConfig.head_dim"),
    (ModelConfig, dict(remat="save_only_these_names"), "dots_saveable"),
    (ModelConfig, dict(dtype="float8"), "dtype"),
    (AttentionConfig, dict(position_encoding="alibi"), "position_encoding"),
    (ModelConfig, dict(pattern="*-?"), "position 2"),
    (AttentionConfig, dict(window=0), "AttentionConfig.window"),
    (AttentionConfig, dict(sinks=2), "AttentionConfig.window"),
    (AttentionConfig, dict(impl="flash"), "AttentionConfig.impl"),
    (MambaConfig, dict(impl="flash"), "MambaConfig.impl"),
    (MLPConfig, dict(hidden_dim=0), "MLPConfig.hidden_dim"),
    (ModelConfig, dict(loss_chunk=-1), "ModelConfig.loss_chunk=-1 .* >= 0"),
    (ModelConfig, dict(loss_chunk="on"), "ModelConfig.loss_chunk='on' .*'auto', 'off'"),
])
def test_config_validation(config, overrides, message):
  with pytest.raises(ValueError, match=message):
    config(**overrides)


def test_config_odd_head_dim_without_rope_is_fine():
  ModelConfig(attention=AttentionConfig(head_dim=33, position_encoding="none"))


def test_sub_config_type_is_checked():
  with pytest.raises(TypeError, match="ModelConfig.attention"):
    ModelConfig(attention=MLPConfig())


def test_config_is_gin_configurable():
  # A scoped binding, so the global gin config other tests may use is left alone.
  with gin.unlock_config():
    gin.parse_config("test_lm_scope/ModelConfig.d_model = 64")
    gin.parse_config("test_lm_scope/AttentionConfig.num_heads = 8")
  with gin.config_scope("test_lm_scope"):
    assert ModelConfig().d_model == 64
    assert ModelConfig().attention.num_heads == 8  # sub-configs take their own bindings
  assert ModelConfig().d_model == 128
  assert ModelConfig().attention.num_heads == 4


@pytest.mark.parametrize("remat, wrapped", [("none", 0), ("full", 4), ("dots_saveable", 4)])
def test_remat_wraps_each_block(remat, wrapped):
  graphdef, state = nnx.split(make(dataclasses.replace(SMALL, remat=remat)))
  ids = jnp.zeros((1, 8), jnp.int32)
  fwd = lambda state: nnx.merge(graphdef, state)(ids, jnp.ones_like(ids), ids)
  assert str(jax.make_jaxpr(fwd)(state)).count("remat") == wrapped


def test_embed_init_std_sets_only_the_embedding():
  model = make(dataclasses.replace(SMALL, embed_init_std=1.0, init_std=0.02))
  assert 0.9 < float(jnp.std(model.embed.embedding[...])) < 1.1
  assert float(jnp.std(model.blocks[0].mixer.q[...])) < 0.05
  default = make(SMALL)
  assert float(jnp.std(default.embed.embedding[...])) < 0.05  # None: init_std


# --- the loss from hidden states and head (ModelConfig.loss_chunk: plain or chunked) ---

# The same per-token arithmetic batched differently (seen <= 2e-7).
F32_LOSS = 1e-6


def train_batch(rng, rows=2, seq=24, vocab=SMALL.vocab_size):
  segment_ids = random_segments(rng, rows, seq)
  weights = (segment_ids > 0) & (rng.random((rows, seq)) > 0.2)  # padding and some tokens off
  return {"inputs": rng.integers(0, vocab, (rows, seq)).astype(np.int32),
          "targets": rng.integers(0, vocab, (rows, seq)).astype(np.int32),
          "segment_ids": segment_ids, "positions": positions_of(segment_ids),
          "loss_weights": weights.astype(np.float32)}


def keep_gradients() -> optax.GradientTransformation:
  """An optimizer whose state is the last (normalised) gradients; it leaves params alone."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def train_step_loss_and_grads(cfg, data):
  graphdef, state = nnx.split(make(cfg))
  params = nnx.to_pure_dict(state)
  optimizer = keep_gradients()
  step = jax.jit(make_train_step(graphdef, optimizer, lambda step: 0.0, 1))
  new_state, metrics = step({"step": 0, "params": params, "opt_state": optimizer.init(params)},
                            data)
  return metrics["loss"], new_state["opt_state"]


def assert_same_grads(grads, want):
  want = dict(jax.tree_util.tree_leaves_with_path(want))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert_close(g, want[path], F32_GRAD, jax.tree_util.keystr(path))


@pytest.mark.parametrize("tie", [True, False])
def test_train_step_same_with_chunked_loss(rng, tie):
  """Loss-weighted train step: 24 tokens in chunks of 5 (a short last chunk) against the plain
  loss; the tied head's gradient reaches the embedding through both of its uses."""
  data = train_batch(rng)
  cfg = dataclasses.replace(SMALL, tie_embeddings=tie, dtype="float32")
  want_loss, want_grads = train_step_loss_and_grads(dataclasses.replace(cfg, loss_chunk="off"),
                                                    data)
  loss, grads = train_step_loss_and_grads(dataclasses.replace(cfg, loss_chunk=5), data)
  assert_close(loss, want_loss, F32_LOSS, "loss")
  assert_same_grads(grads, want_grads)


def test_loss_from_hidden_states_equals_logits(rng):
  """token_losses (hidden states + head, plain) gives the losses of the logits __call__ returns."""
  data = train_batch(rng)
  graphdef, state = nnx.split(make(dataclasses.replace(SMALL, loss_chunk="off")))
  losses, predictions = jax.jit(lambda state: token_losses(graphdef, state, data))(state)
  logits = forward(nnx.merge(graphdef, state), data["inputs"], data["segment_ids"],
                   data["positions"])
  want = optax.softmax_cross_entropy_with_integer_labels(logits, data["targets"])
  assert_close(losses, want, F32_LOSS, "losses")
  np.testing.assert_array_equal(predictions, jnp.argmax(logits, -1))


SHARDED = dataclasses.replace(SMALL, dtype="float32", attention=dataclasses.replace(
    SMALL.attention, block_q=8, block_kv=8))


@pytest.mark.parametrize("mesh_axes,chunk", [
    (dict(sequence=8), 3),  # 8 local tokens: chunks of 3, a short last one
    (dict(data=2, sequence=4), 16),  # 16 local tokens: one chunk per device
])
def test_chunked_loss_sequence_sharded_matches_one_device(rng, mesh_axes, chunk):
  """Each device chunks its own tokens (zigzag layout); losses (back in the original order),
  their weighted sum and the gradients equal the plain loss on one device."""
  seq = 64
  data = train_batch(rng, rows=2, seq=seq)
  graphdef, params = nnx.split(make(dataclasses.replace(SHARDED, loss_chunk="off")))

  def loss_fn(graphdef, batch):
    def weighted(params):
      losses, _ = token_losses(graphdef, params, batch)
      return jnp.sum(losses * batch["loss_weights"]), losses
    return jax.jit(jax.value_and_grad(weighted, has_aux=True))(params)

  (want_loss, want_losses), want_grads = loss_fn(graphdef, data)
  mesh = make_mesh(MeshConfig(**{"data": 1, **mesh_axes}))
  seq_sharding = SequenceSharding.create(mesh, sharding.DEFAULT_RULES, SequenceConfig())
  sharded_graphdef, _ = nnx.split(LM(dataclasses.replace(SHARDED, loss_chunk=chunk),
                                     rngs=nnx.Rngs(0), sequence=seq_sharding))
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, sharding.DEFAULT_RULES))
  batch = {k: put(v) for k, v in permute_batch(data, "zigzag", seq_sharding.shards).items()}
  (loss, losses), grads = loss_fn(sharded_graphdef, batch)
  # F32, not F32_LOSS: ring attention sums in another order before the loss.
  assert_close(loss, want_loss, F32, "loss")
  assert_close(unpermute(np.asarray(losses), "zigzag", seq_sharding.shards), want_losses, F32,
               "losses")
  assert_same_grads(grads, want_grads)


def test_chunked_loss_keeps_the_logits_out_of_the_train_step():
  """The whole compiled train step (MLP blocks only, so no attention scores compete): its
  temporaries hold the float32 logits with the plain loss and not with chunks of 128 tokens."""
  rows, seq, vocab = 2, 2048, 8192
  logits_bytes = rows * seq * vocab * 4  # 128 MiB

  def temp_bytes(loss_chunk):
    cfg = dataclasses.replace(SMALL, vocab_size=vocab, pattern="--", dtype="float32",
                              loss_chunk=loss_chunk)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make(cfg)))
    params = nnx.to_pure_dict(state)
    optimizer = optax.sgd(0.1)
    step = jax.jit(make_train_step(graphdef, optimizer, lambda step: 0.1, 1))
    tokens = jax.ShapeDtypeStruct((rows, seq), jnp.int32)
    batch = dict.fromkeys(("inputs", "targets", "segment_ids", "positions"), tokens)
    batch["loss_weights"] = jax.ShapeDtypeStruct((rows, seq), jnp.float32)
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
             "opt_state": jax.eval_shape(optimizer.init, params)}
    return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

  # Seen: 271 MiB plain, 33 MiB chunked (a few chunk-sized buffers of 8 MiB, and the model).
  plain, chunked = temp_bytes("off"), temp_bytes(128)
  assert plain > logits_bytes, (plain, logits_bytes)
  assert chunked < logits_bytes / 3, (chunked, logits_bytes)
