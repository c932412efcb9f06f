"""TrainConfig.init_from: a run starts from another run's checkpoint (its parameters, and in
"params_and_optimizer" mode its optimizer state) at step 0, with another RoPE base and
sequence length; clear errors when the checkpoint is missing or does not fit."""

import gin
import jax
import numpy as np
import optax
import pytest

from lcjax.config import parse_gin
from lcjax.errors import ConfigError
from lcjax.run import Run, build
from lcjax.train import init_from
from lcjax.train import state as train_state
from lcjax.train.checkpoint import Checkpointer
from tests.train.runs import DEMO_GIN, bindings, read_jsonl, train_in_process

SOURCE = bindings(TrainConfig__steps=2, TrainConfig__checkpoint_every=2,
                  TrainConfig__eval_every=1000, DataConfig__eval_tasks=("lcjax_mqar",))
# The new run: a longer context with another RoPE base (neither changes the parameters).
EXTENDED = SOURCE + ["DataConfig.sequence_length = 256", "AttentionConfig.rope_theta = 1e6"]


@pytest.fixture(scope="module")
def source(tmp_path_factory, shared_compile_cache):
  """A trained run's workdir (checkpoint at step 2)."""
  workdir = tmp_path_factory.mktemp("source")
  train_in_process(workdir, SOURCE)
  return workdir


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _initial(spec: str, mode: str = "params", extra=()) -> tuple[dict, dict, Run]:
  """(the state initialised from `spec`, a fresh state, the run) for EXTENDED + `extra`."""
  parse_gin([DEMO_GIN], EXTENDED + [f"TrainConfig.init_from = {spec!r}",
                                    f"TrainConfig.init_mode = {mode!r}", *extra])
  run = Run.from_gin()
  setup = build(run)
  fresh = train_state.init_state(run.model, run.train.seed, setup.optimizer, setup.shardings)
  fresh_host = jax.device_get(fresh)
  return jax.device_get(init_from.initial_state(run.train, setup, fresh, "")), fresh_host, run


def _saved(source, run: Run) -> dict:
  setup = build(run)
  ckpt = Checkpointer(str(source), every=1, keep=1, create=False)
  state, _ = ckpt.restore(2, setup.abstract_state(), "")
  ckpt.close()
  return jax.device_get(state)


def _assert_equal(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def _schedule_states(opt_state) -> list:
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(x)]


def test_params_mode_takes_exactly_its_parameters_and_starts_at_step_0(source, clean_gin):
  state, fresh, run = _initial(str(source))
  saved = _saved(source, run)
  _assert_equal(state["params"], saved["params"])
  _assert_equal(state["opt_state"], fresh["opt_state"])  # the optimizer starts fresh
  assert int(state["step"]) == 0 and int(saved["step"]) == 2


def test_params_and_optimizer_mode_takes_the_moments_and_restarts_the_schedule(source,
                                                                                clean_gin):
  state, fresh, run = _initial(f"{source}/checkpoints:2", "params_and_optimizer")
  saved = _saved(source, run)
  _assert_equal(state["params"], saved["params"])
  (schedule,), (saved_schedule,) = _schedule_states(state["opt_state"]), _schedule_states(
      saved["opt_state"])
  assert int(schedule.count) == 0 and int(saved_schedule.count) == 2
  restarted = jax.tree.map(lambda x: x, saved["opt_state"])
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
  restarted = jax.tree.map(lambda x: schedule if is_schedule(x) else x, restarted,
                           is_leaf=is_schedule)
  _assert_equal(state["opt_state"], restarted)  # moments and AdamW's count as saved
  assert int(state["step"]) == 0


def test_a_run_initialised_from_another_trains_from_step_0_and_then_resumes_itself(
    source, tmp_path, capsys):
  extended = EXTENDED + ["TrainConfig.steps = 1", f"TrainConfig.init_from = '{source}'"]
  train_in_process(tmp_path, extended)
  assert f"Initialised from {source}/checkpoints/2 (params)" in capsys.readouterr().out
  (row,) = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
  # Its own one-step schedule (no warmup: the peak), not the source's, which ended at 10% of it.
  assert row["step"] == 1 and row["lr"] == pytest.approx(5e-3) and row["sequence_length"] == 256
  summary = train_in_process(tmp_path, extended)  # its own checkpoint now takes precedence
  out = capsys.readouterr().out
  assert "is ignored: this workdir has checkpoints of its own" in out
  assert f"Resumed from {tmp_path}/checkpoints/1" in out and summary["step"] == 1


@pytest.mark.parametrize("spec, message", [
    ("{tmp}/no_such_run", "{tmp}/no_such_run does not exist"),
    ("{tmp}", "{tmp} holds no checkpoints/ directory"),
    ("{source}:7", "no checkpoint 7 in {source}/checkpoints (its steps: [2])"),
])
def test_a_missing_checkpoint_is_a_config_error(source, tmp_path, clean_gin, spec, message):
  spec, message = (s.format(tmp=tmp_path, source=source) for s in (spec, message))
  with pytest.raises(ConfigError) as err:
    _initial(spec)
  assert message in str(err.value) and "\n" not in str(err.value), err.value


def test_a_changed_parameter_shape_names_the_parameter_and_both_shapes(source, clean_gin):
  with pytest.raises(ConfigError) as err:
    _initial(str(source), extra=["ModelConfig.d_model = 64"])
  message = str(err.value)
  assert "this run's parameters cannot take that checkpoint's" in message, message
  assert "params.blocks.0.mixer.k float32[32, 1, 16] -> float32[64, 1, 16]" in message, message
  assert "TrainConfig.init_from" in message and "\n" not in message


def test_an_optimizer_state_that_does_not_fit_names_init_mode():
  abstract = {"params": {"w": jax.ShapeDtypeStruct((2, 3), np.float32)},
              "opt_state": {"mu": jax.ShapeDtypeStruct((2, 3), np.float32)}}
  saved = {"params": {"w": jax.ShapeDtypeStruct((2, 3), np.float32)},
           "opt_state": {"mu": jax.ShapeDtypeStruct((2, 3), np.float32),
                         "nu": jax.ShapeDtypeStruct((2, 3), np.float32)}}
  with pytest.raises(ConfigError, match=r"this run's optimizer state cannot take that "
                     r"checkpoint's: 1 in "
                     r"that checkpoint, not in this run: opt_state.nu float32\[2, 3\]\. Fix: "
                     r"set TrainConfig.init_mode = 'params'"):
    init_from._check(saved, abstract, "TrainConfig.init_from = 'X'")
  init_from._check(saved, {"params": abstract["params"]}, "X")  # params mode: only params


def test_parse():
  assert init_from.parse("/runs/a") == ("/runs/a", None)
  assert init_from.parse("/runs/a:120") == ("/runs/a", 120)
  assert init_from.parse("gs://b/a") == ("gs://b/a", None)


def test_eval_of_a_run_not_yet_trained_evaluates_its_init_from_into_its_own_directory(
    source, tmp_path, clean_gin, capsys):
  from lcjax.eval.__main__ import evaluate_checkpoint

  parse_gin([DEMO_GIN], EXTENDED + [f"TrainConfig.init_from = '{source}'",
                                    "EvalConfig.suite = ()"])
  results = evaluate_checkpoint(str(tmp_path))
  assert "has no checkpoint of its own: evaluating TrainConfig.init_from" in (
      capsys.readouterr().out)
  assert results["step"] == 2 and results["checkpoint"] == f"{source}/checkpoints/2"
  assert (tmp_path / "eval" / "2" / "results.json").exists()
  assert not (source / "eval").exists()  # the source run is only read
  # Its own checkpoint, once it has one, takes precedence (as for lcjax.train).
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(Exception, match="available steps: \\[\\]"):
    evaluate_checkpoint(str(tmp_path))
