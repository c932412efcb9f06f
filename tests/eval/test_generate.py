"""Batched greedy generation: the full forward's argmax token by token, independent of the
batch it runs in, EOS stopping, and one compilation per bucket."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcjax.eval import generate
from lcjax.eval.generate import bucket_length, greedy_generate
from lcjax.models.lm import LM
from tests.models.test_decode import CFG

# Large enough weights that the argmax changes from token to token.
INIT_STD = 0.3
NO_EOS = CFG.vocab_size  # never generated


def random_model(rng, pattern="M*M-", **attention):
  cfg = dataclasses.replace(CFG, pattern=pattern, init_std=INIT_STD,
                            attention=dataclasses.replace(CFG.attention, **attention))
  return nnx.split(LM(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30)))))


def random_prompts(rng, lengths):
  return [rng.integers(1, CFG.vocab_size, n).tolist() for n in lengths]


@nnx.jit
def forward(model, tokens):
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return model(tokens, jnp.ones_like(tokens), positions)


def test_bucket_length():
  assert [bucket_length(n) for n in (1, 15, 16, 17, 100)] == [16, 16, 16, 32, 128]
  assert [bucket_length(n, min_bucket=4) for n in (1, 4, 5, 8)] == [4, 4, 8, 8]


@pytest.mark.parametrize("pattern, position_encoding, window, sinks", [
    ("M*M-", "rope", None, 0), ("*-*-", "rope", None, 0), ("M*M-", "none", None, 0),
    ("*-*-", "rope", 5, 2)])
def test_greedy_is_the_full_forwards_argmax(rng, pattern, position_encoding, window, sinks):
  """Each generated token is the argmax of the full forward over the prompt and the tokens
  generated before it (one forward per row: it is causal). Ties up to float32 error aside."""
  graphdef, params = random_model(rng, pattern, position_encoding=position_encoding,
                                  window=window, sinks=sinks)
  prompts, new = random_prompts(rng, [3, 11, 14]), 6  # two batches of one bucket
  got = greedy_generate(graphdef, params, prompts, max_new_tokens=new, eos_id=NO_EOS,
                        batch_size=2)
  assert [len(g) for g in got] == [new] * len(prompts)
  rows = np.zeros((len(prompts), 14 + new), np.int32)
  for i, (p, g) in enumerate(zip(prompts, got)):
    rows[i, :len(p) + new] = p + g
  logits = np.asarray(forward(nnx.merge(graphdef, params), jnp.asarray(rows)))
  slack = 1e-4 * np.abs(logits).max()
  for i, (p, g) in enumerate(zip(prompts, got)):
    step_logits = logits[i, len(p) - 1:len(p) - 1 + new]
    chosen = step_logits[np.arange(new), g]
    assert np.all(chosen >= step_logits.max(-1) - slack), (i, g, step_logits.argmax(-1))


def test_batched_equals_each_prompt_alone(rng):
  """Rows of different lengths (left-padded) and dummy rows change nothing; nor does the
  split of the model's state into its nnx.Param part and the rest (as eval passes it)."""
  graphdef, params, rest = nnx.split(nnx.merge(*random_model(rng)), nnx.Param, ...)
  assert not jax.tree.leaves(rest)
  prompts = random_prompts(rng, [4, 16, 1])  # alone: each its own bucket, unpadded
  got = greedy_generate(graphdef, params, prompts, max_new_tokens=5, eos_id=NO_EOS,
                        batch_size=2)
  alone = [greedy_generate(graphdef, params, [p], max_new_tokens=5, eos_id=NO_EOS,
                           batch_size=1, min_bucket=len(p))[0] for p in prompts]
  assert got == alone


def test_stops_at_eos(rng):
  """EOS = the token generated at step j: generation stops there (EOS left out), row by row."""
  graphdef, params = random_model(rng)
  prompts = random_prompts(rng, [6, 9])
  free = greedy_generate(graphdef, params, prompts, max_new_tokens=8, eos_id=NO_EOS)
  eos = free[0][3]
  got = greedy_generate(graphdef, params, prompts, max_new_tokens=8, eos_id=eos)
  assert got == [g[:g.index(eos)] if eos in g else g for g in free]
  assert len(got[0]) <= 3


def test_compiles_once_per_bucket(rng):
  """Lengths 5, 9, 13 share bucket 16: one prefill and one decode loop for both batches of
  two; length 17 adds bucket 32 (one more of each)."""
  graphdef, params = random_model(rng)
  before = dict(generate.TRACES)
  delta = lambda name: generate.TRACES[name] - before.get(name, 0)
  # max_new_tokens=3 appears in no other test, so nothing is compiled for it yet.
  greedy_generate(graphdef, params, random_prompts(rng, [5, 9, 13]), max_new_tokens=3,
                  eos_id=NO_EOS, batch_size=2)
  assert (delta("prefill"), delta("decode")) == (1, 1)
  greedy_generate(graphdef, params, random_prompts(rng, [13, 17]), max_new_tokens=3,
                  eos_id=NO_EOS, batch_size=2)
  assert (delta("prefill"), delta("decode")) == (2, 2)


def test_bad_arguments(rng):
  graphdef, params = random_model(rng)
  assert greedy_generate(graphdef, params, [[1, 2]], max_new_tokens=0, eos_id=0) == [[]]
  with pytest.raises(ValueError, match="empty"):
    greedy_generate(graphdef, params, [[1], []], max_new_tokens=2, eos_id=0)
