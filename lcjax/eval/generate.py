"""Batched greedy generation with the decoding caches (`lcjax.models.lm.LM.prefill` and
`decode_step`).

Prompts are grouped by length bucket (`bucket_length`: the next power of two) and left-padded to
it, so a sweep over many prompt lengths compiles one prefill and one decode loop per (bucket,
batch size), not one per length. Within a bucket, rows of different lengths share a batch: the
prefill is told each row's length and keeps the pads out of every mixer.
"""

import collections
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# How often each jitted function below was traced (= compiled): "prefill" and "decode". Read by
# tests to check that a sweep compiles once per bucket.
TRACES = collections.Counter()


def bucket_length(n: int, min_bucket: int = 16) -> int:
  """The smallest power of two >= max(n, min_bucket)."""
  return 1 << (max(n, min_bucket) - 1).bit_length()


def _prefill(graphdef, params, tokens, lengths, *, max_len):
  """tokens `[batch, bucket]` left-padded, lengths `[batch]` -> (the first generated token
  `[batch]` int32, the cache with room for max_len tokens)."""
  TRACES["prefill"] += 1
  model = nnx.merge(graphdef, params)
  logits, cache = model.prefill(tokens, model.init_cache(tokens.shape[0], max_len), lengths)
  return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def _decode(graphdef, params, first, cache, eos_id, live, *, max_new_tokens):
  """Greedy steps from the first token `[batch]` -> int32 `[batch, max_new_tokens]`, eos_id
  after each row's first EOS. Stops early once every live row (live `[batch]` bool: not a
  dummy) has emitted EOS."""
  TRACES["decode"] += 1

  def running(carry):
    t, _, done, _, _ = carry
    return (t < max_new_tokens) & ~jnp.all(done)

  def step(carry):
    t, token, done, cache, out = carry
    logits, cache = nnx.merge(graphdef, params).decode_step(token, cache)
    token = jnp.where(done, eos_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, t))
    return t + 1, token, done | (token == eos_id), cache, out

  out = jnp.full((first.shape[0], max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first)
  carry = (jnp.int32(1), first, (first == eos_id) | ~live, cache, out)
  return jax.lax.while_loop(running, step, carry)[-1]


# The jitted (prefill, decode) of each graphdef seen, by id (a GraphDef is not hashable, so it
# cannot be a static argument); the graphdef is kept so that its id stays its own.
_JITTED: dict[int, tuple] = {}


def _jitted(graphdef):
  """(prefill, decode) jitted for `graphdef`, made once per graphdef so that later calls (a
  sweep's next cell) reuse the compilations."""
  entry = _JITTED.get(id(graphdef))
  if entry is None or entry[0] is not graphdef:
    entry = (graphdef,
             jax.jit(functools.partial(_prefill, graphdef), static_argnames="max_len"),
             jax.jit(functools.partial(_decode, graphdef), static_argnames="max_new_tokens"))
    _JITTED[id(graphdef)] = entry
  return entry[1:]


def _batches(prompts, batch_size: int, min_bucket: int):
  """(bucket, indices of at most batch_size prompts) for every batch, one bucket per batch."""
  by_bucket = collections.defaultdict(list)
  for i, prompt in enumerate(prompts):
    by_bucket[bucket_length(len(prompt), min_bucket)].append(i)
  for bucket, indices in sorted(by_bucket.items()):
    for lo in range(0, len(indices), batch_size):
      yield bucket, indices[lo:lo + batch_size]


def _left_padded(prompts, bucket: int, batch_size: int):
  """tokens `[batch_size, bucket]` (each prompt right-aligned after pad id 0) and lengths
  `[batch_size]`; rows past the prompts are dummies of one pad token."""
  tokens = np.zeros((batch_size, bucket), np.int32)
  lengths = np.ones((batch_size,), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, bucket - len(prompt):] = prompt
    lengths[row] = len(prompt)
  return tokens, lengths


def greedy_generate(graphdef, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    eos_id: int, batch_size: int = 8, min_bucket: int = 16) -> list[list[int]]:
  """The greedily generated token ids for each prompt, in the prompts' order: up to
  max_new_tokens each, stopping before the first EOS (which is left out).

  graphdef, params: `nnx.split` of an `lcjax.models.lm.LM` on one device (params may be just its
  nnx.Param state). Prompts (non-empty, any lengths and order) run batch_size at a time, each
  batch from one bucket (`bucket_length`) and padded with dummy rows so shapes stay fixed; the
  caches hold bucket + max_new_tokens tokens.
  """
  if max_new_tokens < 0 or batch_size < 1:
    raise ValueError(f"greedy_generate needs max_new_tokens >= 0 and batch_size >= 1, got "
                     f"max_new_tokens={max_new_tokens}, batch_size={batch_size}.")
  empty = [i for i, p in enumerate(prompts) if not len(p)]
  if empty:
    raise ValueError(f"greedy_generate: prompts {empty[:5]} are empty; every prompt needs at "
                     f"least one token to predict from.")
  results = [[] for _ in prompts]
  if max_new_tokens == 0:
    return results
  prefill, decode = _jitted(graphdef)
  for bucket, indices in _batches(prompts, batch_size, min_bucket):
    tokens, lengths = _left_padded([prompts[i] for i in indices], bucket, batch_size)
    first, cache = prefill(params, tokens, lengths, max_len=bucket + max_new_tokens)
    live = np.arange(batch_size) < len(indices)
    out = np.asarray(decode(params, first, cache, jnp.int32(eos_id), live,
                            max_new_tokens=max_new_tokens))
    for row, i in enumerate(indices):
      ids = out[row].tolist()
      results[i] = ids[:ids.index(eos_id)] if eos_id in ids else ids
  return results
