"""Dataset Decomposition through the loop: batches of several lengths, one compile each, exact
resume; and the run-assembly checks that go with the other context-extension switches."""

import shutil

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lcjax.config import parse_gin
from lcjax.data import pipeline
from lcjax.errors import ConfigError
from lcjax.models.loss import token_losses
from lcjax.run import Run, build, train_shapes
from lcjax.train.state import init_state
from tests.train.runs import DEMO_GIN, bindings, train_in_process, train_losses

STEPS = 6
BUCKETS = bindings(TrainConfig__steps=STEPS, TrainConfig__checkpoint_every=2,
                   TrainConfig__keep_checkpoints=10, TrainConfig__eval_every=1000,
                   DataConfig__eval_tasks=("lcjax_mqar",),
                   DataConfig__length_buckets=(32, 64, 128), DataConfig__bucket_odds=(1.0,) * 3,
                   DataConfig__loss_normalization="documents")


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _params(workdir, step: int) -> list[np.ndarray]:
  state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def test_train_shapes_hold_constant_tokens(clean_gin):
  parse_gin([DEMO_GIN], BUCKETS)
  run = Run.from_gin()
  assert train_shapes(run) == [(32, 32), (16, 64), (8, 128)]
  # The run's first steps read more than one length (so the resume test below crosses them).
  it = pipeline.make_train_iterator(run.data, 8, steps=STEPS)
  assert len({next(it)["targets"].shape for _ in range(STEPS)}) > 1


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shared_compile_cache):
  workdir = tmp_path_factory.mktemp("buckets")
  train_in_process(workdir, BUCKETS)
  return workdir


@pytest.mark.parametrize("resume_at", [2, 4])
def test_resume_with_length_buckets_matches_bitwise(uninterrupted, tmp_path, resume_at):
  shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
  for d in (tmp_path / "checkpoints").iterdir():
    if d.name.isdigit() and int(d.name) > resume_at:
      shutil.rmtree(d)
  train_in_process(tmp_path, BUCKETS)
  losses = train_losses(uninterrupted)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert train_losses(tmp_path) == losses
  for got, expected in zip(_params(tmp_path, STEPS), _params(uninterrupted, STEPS)):
    np.testing.assert_array_equal(got, expected)


def test_a_bucket_the_mesh_cannot_split_fails_at_build(clean_gin):
  parse_gin([DEMO_GIN], BUCKETS + ["MeshConfig.data = 1", "MeshConfig.sequence = 8",
                                   "DataConfig.length_buckets = (4, 128)",
                                   "DataConfig.bucket_odds = None"])
  with pytest.raises(ConfigError, match="Sequence length 4 is not divisible by the 8 devices"):
    build(Run.from_gin())


def test_anchor_attention_without_anchor_rows_fails_at_build(clean_gin):
  parse_gin([DEMO_GIN], bindings() + ["AttentionConfig.anchor = True"])
  with pytest.raises(ConfigError, match="set DataConfig.anchor = True"):
    build(Run.from_gin())


def test_s2_attention_trains_grouped_and_evaluates_in_full(clean_gin):
  """The eval step of an S² run is the eval step of the same run without S² (same params)."""
  tiny = bindings() + ["ModelConfig.pattern = '*'", "DataConfig.sequence_length = 64"]
  parse_gin([DEMO_GIN], tiny + ["AttentionConfig.s2_groups = 4"])
  s2 = build(Run.from_gin())
  gin.clear_config()
  parse_gin([DEMO_GIN], tiny)
  full = build(Run.from_gin())
  assert s2.graphdef != full.graphdef  # the train step's model groups its attention
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(3, 256, (8, 64)), "targets": rng.integers(3, 256, (8, 64)),
           "segment_ids": np.ones((8, 64)), "positions": np.tile(np.arange(64), (8, 1)),
           "loss_weights": np.ones((8, 64))}
  batch = {k: v.astype(np.float32 if k == "loss_weights" else np.int32) for k, v in batch.items()}
  run = Run.from_gin()
  params = init_state(run.model, 0, full.optimizer, full.shardings)["params"]
  np.testing.assert_array_equal(s2.eval_step(params, batch)[0], full.eval_step(params, batch)[0])
  grouped, _ = token_losses(s2.graphdef, params, batch)
  whole, _ = token_losses(full.graphdef, params, batch)
  assert not np.allclose(grouped, whole)  # ... while the train step's model does group
