"""Teacher-forced scoring at a length other than the training length: answers and loss by
position against cross-entropy computed by hand from `LM.__call__` logits, and a mesh with a
`sequence` axis against one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax.data.pipeline import DataConfig
from lcjax.errors import ConfigError
from lcjax.eval.teacher_forced import (answer_batch, position_buckets, ppl_by_position,
                                       score_answers)
from lcjax.models.lm import LM
from lcjax.parallel.mesh import MeshConfig
from lcjax.run import Run, TrainConfig, build
from lcjax.train.optim import OptimConfig
from tests.numerics import F32, assert_close
from tests.parallel.test_sequence_model import CFG as HYBRID

# The sequence-sharding tests' tiny hybrid, with the byte vocabulary the runs check for and a
# larger init, so predictions vary from token to token.
CFG = dataclasses.replace(HYBRID, vocab_size=384, pattern="M*-", init_std=0.5)
TRAIN_LEN = 64  # what the runs are built for
SEQ = 256  # what they score at
ROWS = 4
REF_ROWS = 8
MESHES = {"one": dict(data=1), "seq8": dict(data=1, sequence=8),
          "data2_seq4": dict(data=2, sequence=4)}


def _build(mesh_axes):
  run = Run(CFG, DataConfig(sequence_length=TRAIN_LEN), TrainConfig(batch_size=8), OptimConfig(),
            MeshConfig(**mesh_axes))
  return build(run)


@pytest.fixture(scope="module")
def model():
  return LM(CFG, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def setups(model):
  """{mesh name: (setup, params placed with its shardings)}; "one" runs on one device."""
  devices = jax.devices()
  host_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  out = {}
  for name, axes in MESHES.items():
    with pytest.MonkeyPatch.context() as mp:
      if name == "one":
        mp.setattr("lcjax.parallel.mesh.jax.devices", lambda: devices[:1])
      setup = _build(axes)
    out[name] = (setup, jax.device_put(host_params, setup.shardings["params"]))
  return out


def reference_log_probs(model, token_rows: list) -> np.ndarray:
  """log softmax `[n, SEQ, vocab]` of each row of tokens (right-padded, one document), from
  the model called directly on one device (REF_ROWS rows a call: one compilation)."""
  assert len(token_rows) <= REF_ROWS
  inputs = np.zeros((REF_ROWS, SEQ), np.int32)
  segment_ids = np.zeros_like(inputs)
  for i, tokens in enumerate(token_rows):
    inputs[i, :len(tokens)] = tokens
    segment_ids[i, :len(tokens)] = 1
  positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), inputs.shape)
  logits = _forward(nnx.split(model), inputs, segment_ids, positions)
  logits = np.asarray(logits[:len(token_rows)], np.float64)
  logits -= logits.max(-1, keepdims=True)
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


@jax.jit
def _forward(split, inputs, segment_ids, positions):
  return nnx.merge(*split)(inputs, segment_ids, positions).astype(jnp.float32)


def random_pairs(rng, model, n_random: int, n_greedy: int):
  """(prompt, target) pairs: random targets, and greedy continuations (exact match 1)."""
  pairs = []
  for i in range(n_random + n_greedy):
    prompt = rng.integers(1, 259, rng.integers(1, 200)).tolist()
    pairs.append((prompt, rng.integers(1, 259, rng.integers(1, 8)).tolist()))
  greedy = [p for p, _ in pairs[n_random:]]
  for _ in range(3):
    log_probs = reference_log_probs(model, greedy)
    greedy = [p + [int(log_probs[i, len(p) - 1].argmax())] for i, p in enumerate(greedy)]
  pairs[n_random:] = [(p[:-3], p[-3:]) for p in greedy]
  return pairs


def test_score_answers_match_cross_entropy_by_hand(rng, model, setups):
  setup, params = setups["one"]
  pairs = random_pairs(rng, model, 4, 3)
  got = score_answers(setup.eval_step_at(SEQ), params, pairs, SEQ, ROWS)
  log_probs = reference_log_probs(model, [(p + t)[:-1] for p, t in pairs])
  for i, ((prompt, target), result) in enumerate(zip(pairs, got)):
    at = np.arange(len(prompt) - 1, len(prompt) + len(target) - 1)  # predicting the target
    token_losses = -log_probs[i, at, target]
    hits = log_probs[i, at].argmax(-1) == np.asarray(target)
    assert_close(result["loss"], token_losses.mean(), F32, f"example {i}")
    assert result["token_accuracy"] == hits.mean()
    assert result["exact_match"] == float(hits.all())
  assert [r["exact_match"] for r in got[4:]] == [1.0] * 3


def random_documents(rng, n: int) -> list:
  """Token lists, some shorter than SEQ + 1 (skipped by ppl_by_position)."""
  return [rng.integers(1, 259, rng.choice([SEQ // 2, SEQ + 1, SEQ + 40])).tolist()
          for _ in range(n)]


def test_ppl_by_position_matches_cross_entropy_by_hand(rng, model, setups):
  setup, params = setups["one"]
  documents = random_documents(rng, 7)
  got = ppl_by_position(setup.eval_step_at(SEQ), params, documents, SEQ, ROWS, 6)
  kept = [d[:SEQ + 1] for d in documents if len(d) > SEQ]
  log_probs = reference_log_probs(model, [d[:-1] for d in kept])
  losses = -np.take_along_axis(log_probs, np.asarray([d[1:] for d in kept])[..., None], -1)[..., 0]
  assert [(r["position_start"], r["position_end"]) for r in got] == position_buckets(SEQ, 6)
  for r in got:
    bucket = losses[:, r["position_start"]:r["position_end"]]
    assert r["length"] == SEQ and r["tokens"] == bucket.size
    assert_close(r["loss"], bucket.mean(), F32, str(r))


@pytest.mark.slow  # compiles the hybrid sharded over the sequence (~17 s each on 2 busy cores)
@pytest.mark.parametrize("mesh", ["seq8", "data2_seq4"])
def test_sequence_sharded_scoring_matches_one_device(rng, model, setups, mesh):
  (one, one_params), (sharded, sharded_params) = setups["one"], setups[mesh]
  assert sharded.sequence is not None and sharded.sequence.layout == "zigzag"
  pairs = random_pairs(rng, model, 3, 1)
  batch = answer_batch(pairs, SEQ, ROWS)
  want_losses, want_correct = one.eval_step_at(SEQ)(one_params, batch)
  losses, correct = sharded.eval_step_at(SEQ)(sharded_params, batch)
  real = batch["segment_ids"] > 0
  assert_close(losses[real], want_losses[real], F32, "per-token losses")
  assert (correct[real] == want_correct[real]).mean() > 0.99  # argmax near-ties may flip
  want = score_answers(one.eval_step_at(SEQ), one_params, pairs, SEQ, ROWS)
  got = score_answers(sharded.eval_step_at(SEQ), sharded_params, pairs, SEQ, ROWS)
  assert_close([r["loss"] for r in got], [r["loss"] for r in want], F32, "answer losses")
  assert [r["exact_match"] for r in got] == [r["exact_match"] for r in want]
  documents = random_documents(rng, 5)
  want = ppl_by_position(one.eval_step_at(SEQ), one_params, documents, SEQ, ROWS, 5)
  got = ppl_by_position(sharded.eval_step_at(SEQ), sharded_params, documents, SEQ, ROWS, 5)
  assert [{k: v for k, v in r.items() if k != "loss"} for r in got] == [
      {k: v for k, v in r.items() if k != "loss"} for r in want]
  assert_close([r["loss"] for r in got], [r["loss"] for r in want], F32, "ppl by position")


def test_eval_step_at_rejects_lengths_and_rows_the_mesh_cannot_split(setups):
  seq8, params = setups["seq8"][0], setups["seq8"][1]
  with pytest.raises(ConfigError, match="Sequence length 200 .* must be a multiple of 16"):
    seq8.eval_step_at(200)  # zigzag: 2 chunks on each of 8 shards
  with pytest.raises(ConfigError, match="positive int"):
    seq8.eval_step_at(0)
  step = seq8.eval_step_at(SEQ)
  with pytest.raises(ValueError, match=r"eval_step_at\(128\)"):
    step(params, answer_batch([([1, 2], [3])], 128, ROWS))
  data2 = setups["data2_seq4"][0]
  with pytest.raises(ConfigError, match="batch size 3 is not divisible by the 2 devices"):
    data2.eval_step_at(SEQ)(setups["data2_seq4"][1], answer_batch([([1, 2], [3])], SEQ, 3))


def test_answer_batch_weights_only_the_target():
  batch = answer_batch([([5, 6, 7], [8, 9]), ([4], [3])], 6, 3)
  np.testing.assert_array_equal(batch["inputs"], [[5, 6, 7, 8, 0, 0], [4, 0, 0, 0, 0, 0],
                                                  [0] * 6])
  np.testing.assert_array_equal(batch["targets"], [[6, 7, 8, 9, 0, 0], [3, 0, 0, 0, 0, 0],
                                                   [0] * 6])
  np.testing.assert_array_equal(batch["loss_weights"], [[0, 0, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0],
                                                        [0] * 6])
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0],
                                                       [0] * 6])
  np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 0, 0], [0, 0, 0, 0, 0, 0],
                                                     [0] * 6])
  assert batch["inputs"].dtype == np.int32 and batch["loss_weights"].dtype == np.float32
  with pytest.raises(ValueError, match="Example 0 takes 7 positions.*seq_len=6"):
    answer_batch([([1] * 5, [2] * 3)], 6, 1)
  with pytest.raises(ValueError, match="at least one token"):
    answer_batch([([], [2])], 6, 1)
  with pytest.raises(ValueError, match="2 examples do not fit a batch of 1 rows"):
    answer_batch([([1], [2])] * 2, 6, 1)


@pytest.mark.parametrize("seq_len,num_buckets", [
    (1, 1), (1, 4), (2, 5), (5, 5), (10, 1), (10, 3), (256, 9), (1000, 12), (4096, 40)])
def test_position_buckets_are_log_spaced_and_cover_the_row(seq_len, num_buckets):
  buckets = position_buckets(seq_len, num_buckets)
  assert len(buckets) == min(seq_len, num_buckets)
  assert buckets[-1][1] == seq_len and buckets[0][0] == 0
  assert buckets[0] == ((0, 1) if len(buckets) > 1 else (0, seq_len))
  assert all(a[1] == b[0] for a, b in zip(buckets, buckets[1:]))  # contiguous
  assert all(start < end for start, end in buckets)  # distinct integer edges
  assert all(isinstance(e, int) for bucket in buckets for e in bucket)


def test_position_buckets_values():
  assert position_buckets(256, 9) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32),
                                      (32, 64), (64, 128), (128, 256)]
  assert position_buckets(5, 5) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
  assert position_buckets(10, 1) == [(0, 10)]
  with pytest.raises(ValueError, match="num_buckets >= 1"):
    position_buckets(10, 0)
