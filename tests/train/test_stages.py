"""Staged training: the stage list in gin, each stage's Run and schedule piece, a run through a
stage boundary, and resuming mid-stage and at the boundary bitwise."""

import shutil

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lcjax.config import parse_gin
from lcjax.errors import ConfigError
from lcjax.run import Run, TrainConfig
from lcjax.train import optim, stages
from lcjax.train.loop import _build_stages, train
from tests.train.runs import (DEMO_GIN, REPO, bindings, read_jsonl, train_in_process,
                              train_losses)

STEPS = 6
# Two stages of 3 steps: 64-token rows of text, then 128-token rows of the demo mixture (the same
# tokens per step), another RoPE base and learning rate. A checkpoint every 2 steps, and one at
# the boundary (step 3).
STAGED = bindings(TrainConfig__steps=STEPS, TrainConfig__checkpoint_every=2,
                  TrainConfig__keep_checkpoints=10, TrainConfig__eval_every=1000,
                  DataConfig__eval_tasks=("lcjax_mqar",)) + [
    "TrainConfig.batch_size = 16",
    "MqarConfig.num_pairs = 3",  # an MQAR example fits 64 tokens
    "MqarConfig.num_queries = 2",
    "TrainConfig.stages = [@short/Stage(), @long/Stage()]",
    "short/Stage.steps = 3",
    "short/Stage.sequence_length = 64",
    "short/Stage.train_mixture = 'lcjax_shakespeare'",  # a passkey prompt needs 103+ tokens
    "long/Stage.steps = 3",
    "long/Stage.sequence_length = 128",
    "long/Stage.batch_tokens = 1024",
    "long/Stage.attention = {'rope_theta': 1e5}",
    "long/Stage.peak_learning_rate = 1e-3",
    "long/Stage.warmup_steps = 1",
]


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _run(extra=()) -> Run:
  parse_gin([DEMO_GIN], STAGED + list(extra))
  return Run.from_gin()


def test_stages_parse_into_runs_with_their_overrides(clean_gin):
  run = _run()
  short, long = stages.plan(run)
  assert (short.name, short.start, short.end) == ("short", 0, 3)
  assert (long.name, long.start, long.end) == ("long", 3, 6)
  assert short.run.data.sequence_length == 64 and short.run.train.batch_size == 16
  assert long.run.data.sequence_length == 128 and long.run.train.batch_size == 8
  assert long.run.model.attention.rope_theta == 1e5
  assert short.run.model.attention == run.model.attention  # None and {} inherit the base
  assert [stages.stage_at([short, long], s) for s in (0, 2, 3, 5, 6)] == [0, 0, 1, 1, 1]
  assert [stages.run_at(run, s).data.sequence_length for s in (1, 3, 4, 6)] == [64, 64, 128, 128]


def test_one_schedule_joined_from_the_stages_pieces(clean_gin):
  run = _run()
  lr = stages.learning_rate(run)
  short = optim.schedule(run.optim, 3)
  long = optim.schedule(stages.stage_optim(run.optim, run.train.stages[1]), 3)
  assert [float(lr(s)) for s in range(6)] == [float(short(s)) for s in range(3)] + [
      float(long(s)) for s in range(3)]
  assert float(lr(3)) == 0.0 and float(lr(4)) == np.float32(1e-3)  # the long stage warms up


@pytest.mark.parametrize("extra, named", [
    (["TrainConfig.steps = 7"], "TrainConfig.steps = 7, but the stages sum to 6 steps "
     "(short/Stage.steps = 3, long/Stage.steps = 3). Set TrainConfig.steps = 6"),
    (["long/Stage.attention = {'rope_thta': 1e5}"], "long/Stage.attention names ['rope_thta']"),
    (["long/Stage.batch_tokens = 1000"], "long/Stage.batch_tokens = 1000 is not a multiple"),
    (["long/Stage.batch_size = 8"], "long/Stage.batch_size and long/Stage.batch_tokens"),
    (["short/Stage.steps = 0", "TrainConfig.steps = 3"], "short/Stage.steps = 0"),
])
def test_bad_stages_are_config_errors_naming_the_binding(clean_gin, extra, named):
  with pytest.raises(ConfigError) as err:
    stages.plan(_run(extra))
  assert named in str(err.value), err.value


def test_a_stage_that_changes_parameter_shapes_fails_before_training(clean_gin, tmp_path):
  with pytest.raises(ConfigError, match=r"stage 1 \(long\) changes the model's parameters: .*"
                     r"changed \(stage 0 -> stage 1 \(long\)\): blocks.0.mixer.k "
                     r"float32\[32, 1, 16\] -> float32\[32, 1, 8\]"):
    train_in_process(tmp_path, STAGED + ["long/Stage.attention = {'head_dim': 8}"])
  assert not (tmp_path / "checkpoints").exists()


def _stage(scope: str, **fields) -> stages.Stage:
  with gin.config_scope(scope):
    return stages.Stage(**fields)


def test_changing_a_started_stage_on_resume_names_the_binding(clean_gin):
  saved = [_stage("short", steps=3, sequence_length=64).record(),
           _stage("long", steps=3, sequence_length=128).record()]
  longer_short = (_stage("short", steps=4, sequence_length=64),
                  _stage("long", steps=2, sequence_length=128))
  with pytest.raises(ConfigError, match=r"short/Stage.steps: 3 -> 4 since checkpoint step 2 "
                     r"in DIR was written, but stage 0 had started"):
    stages.check_resumable(saved, longer_short, 2, "DIR")
  # Only what has started counts: at step 3 the long stage may still change.
  other_long = (_stage("short", steps=3, sequence_length=64),
                _stage("long", steps=9, sequence_length=256))
  stages.check_resumable(saved, other_long, 3, "DIR")
  with pytest.raises(ConfigError, match=r"long/Stage.steps: 3 -> 9"):
    stages.check_resumable(saved, other_long, 4, "DIR")
  with pytest.raises(ConfigError, match=r"TrainConfig.stages changed .* \(0 stages then, 2 now\)"):
    stages.check_resumable([], other_long, 2, "DIR")


def _params(workdir, step: int) -> list[np.ndarray]:
  state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shared_compile_cache):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  train_in_process(workdir, STAGED)
  return workdir


def test_a_staged_run_logs_each_stage_and_checkpoints_its_end(uninterrupted):
  rows = [r for r in read_jsonl(uninterrupted / "metrics.jsonl") if "loss" in r]
  assert [(r["step"], r["stage"], r["sequence_length"]) for r in rows] == [
      (1, 0, 64), (2, 0, 64), (3, 0, 64), (4, 1, 128), (5, 1, 128), (6, 1, 128)]
  assert rows[3]["lr"] == 0.0 and rows[4]["lr"] == pytest.approx(1e-3)
  steps = sorted(int(d.name) for d in (uninterrupted / "checkpoints").iterdir()
                 if d.name.isdigit())
  assert steps == [2, 3, 4, 6]


@pytest.mark.parametrize("resume_at", [2, 3, 4], ids=["mid-stage-0", "boundary", "mid-stage-1"])
def test_resuming_mid_stage_or_at_the_boundary_matches_bitwise(uninterrupted, tmp_path,
                                                               resume_at):
  """A crash right after checkpoint `resume_at` (the later ones never written), then resume:
  the same losses and the same final parameters, bit for bit."""
  shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
  for d in (tmp_path / "checkpoints").iterdir():
    if d.name.isdigit() and int(d.name) > resume_at:
      shutil.rmtree(d)
  train_in_process(tmp_path, STAGED)
  assert train_losses(tmp_path) == train_losses(uninterrupted)
  for got, expected in zip(_params(tmp_path, STEPS), _params(uninterrupted, STEPS)):
    np.testing.assert_array_equal(got, expected)


def test_resuming_with_a_changed_completed_stage_fails(uninterrupted, tmp_path):
  shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
  with pytest.raises(ConfigError, match=r"short/Stage.steps: 3 -> 4 since checkpoint step 6"):
    train_in_process(tmp_path, STAGED + ["short/Stage.steps = 4", "long/Stage.steps = 2"])


def test_no_stages_is_one_stage_of_the_whole_run(clean_gin):
  parse_gin([DEMO_GIN], bindings(TrainConfig__steps=5))
  run = Run.from_gin()
  (only,) = stages.plan(run)
  assert (only.start, only.end, only.run) == (0, 5, run) and TrainConfig().stages == ()
  lr, expected = stages.learning_rate(run), optim.schedule(run.optim, 5)
  assert [float(lr(s)) for s in range(5)] == [float(expected(s)) for s in range(5)]


RECIPES = {  # recipe -> (sequence length, RoPE base) of each stage
    "prolong_style": [(128, 15625.0), (1024, 250000.0)],
    "lwm_progressive": [(32, 1e3), (128, 1e4), (256, 1e4), (512, 2.5e4), (1024, 5e4)],
    "abf_extension": [(64, 1e4), (256, 1e6)],
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_each_recipe_parses_and_builds_its_stages(clean_gin, recipe):
  parse_gin([f"{REPO}/configs/recipes/{recipe}.gin"], [])
  run = Run.from_gin()
  planned = stages.plan(run)
  assert [(p.run.data.sequence_length, p.run.model.attention.rope_theta)
          for p in planned] == RECIPES[recipe]
  assert {p.run.train.batch_size * p.run.data.sequence_length for p in planned} == {8192}
  assert len(_build_stages(planned)) == len(planned)


def test_a_recipe_runs_a_step_per_stage(tmp_path):
  gin.clear_config()
  parse_gin([f"{REPO}/configs/recipes/abf_extension.gin"],
            ["abf_4k/Stage.steps = 1", "abf_16k/Stage.steps = 1", "TrainConfig.steps = 2",
             "TrainConfig.eval_batches = 1", "copying/TokenShareMixture.report_batches = 0",
             "retrieval/TokenShareMixture.report_batches = 0",
             "copying/TokenShareMixture.sample_examples = 8",
             "retrieval/TokenShareMixture.sample_examples = 8"])
  try:
    summary = train(str(tmp_path))
  finally:
    gin.clear_config()
  rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
  assert [(r["step"], r["sequence_length"]) for r in rows] == [(1, 64), (2, 256)]
  assert summary["step"] == 2 and "eval/lcjax_passkey/exact_match" in summary["eval"]


def test_stages_name_a_source_then_a_token_share_mixture_at_another_length(tmp_path, capsys,
                                                                          shared_compile_cache):
  """A corpus of one's own (TextSource) trains stage 0 at 64 tokens; stage 1 names a mixture by
  token share of it and Shakespeare at 128 tokens: the sources are windowed at each stage's
  length, and the mixture reports its shares when its stage starts."""
  (tmp_path / "corpus").mkdir()
  for i in range(4):
    (tmp_path / "corpus" / f"{i}.txt").write_text(f"Document {i}. " * (40 + 30 * i))
  staged = bindings(TrainConfig__steps=2, TrainConfig__eval_every=1000,
                    DataConfig__eval_tasks=("mine",)) + [
      "TrainConfig.batch_size = 8",
      "mine/TextSource.name = 'mine'",
      f"mine/TextSource.files = '{tmp_path}/corpus/[0-2].txt'",
      f"mine/TextSource.validation_files = '{tmp_path}/corpus/3.txt'",
      "mix/TokenShareMixture.name = 'mix'",
      "mix/TokenShareMixture.shares = [('mine', 0.5), ('lcjax_shakespeare', 0.5)]",
      "mix/TokenShareMixture.sample_examples = 8",
      "mix/TokenShareMixture.report_batches = 2",
      "DataConfig.sources = [@mine/TextSource()]",
      "DataConfig.mixtures = [@mix/TokenShareMixture()]",
      "TrainConfig.stages = [@own/Stage(), @mixed/Stage()]",
      "own/Stage.steps = 1",
      "own/Stage.sequence_length = 64",
      "own/Stage.train_mixture = 'mine'",
      "mixed/Stage.steps = 1",
      "mixed/Stage.sequence_length = 128",
      "mixed/Stage.train_mixture = 'mix'",
  ]
  summary = train_in_process(tmp_path / "run", staged)
  rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
  assert [(r["step"], r["stage"], r["sequence_length"]) for r in rows] == [(1, 0, 64),
                                                                           (2, 1, 128)]
  assert "Token shares of mixture 'mix' over its first 2 batches" in capsys.readouterr().out
  assert np.isfinite(summary["eval"]["eval/mine/loss"])


def test_the_demo_recipe_copies_first_then_retrieves(tmp_path):
  """`make demo`'s config (demo.gin + recipes/demo_retrieval.gin) builds both stages and runs a
  step of each on its own mixture."""
  gin.clear_config()
  parse_gin([f"{REPO}/configs/demo.gin", f"{REPO}/configs/recipes/demo_retrieval.gin"],
            ["copying/Stage.steps = 1", "retrieval/Stage.steps = 1", "TrainConfig.steps = 2",
             "TrainConfig.eval_batches = 1", "copying/TokenShareMixture.report_batches = 0",
             "retrieval/TokenShareMixture.report_batches = 0",
             "copying/TokenShareMixture.sample_examples = 8",
             "retrieval/TokenShareMixture.sample_examples = 8"])
  try:
    run = Run.from_gin()
    assert run.model.pattern == "*M-*M-"
    assert [p.run.data.train_mixture for p in stages.plan(run)] == [
        "demo_copying", "demo_retrieval"]
    summary = train(str(tmp_path))
  finally:
    gin.clear_config()
  assert summary["step"] == 2 and "eval/lcjax_copy/exact_match" in summary["eval"]
