import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.kernels.attention import IMPLS, attention, reference_attention
from lcjax.kernels.mask import row_tokens


def random_qkv(rng, batch=2, seq=12, heads=4, kv_heads=2, head_dim=8):
  q = rng.standard_normal((batch, seq, heads, head_dim)).astype(np.float32)
  k = rng.standard_normal((batch, seq, kv_heads, head_dim)).astype(np.float32)
  v = rng.standard_normal((batch, seq, kv_heads, head_dim)).astype(np.float32)
  return q, k, v


def random_segments(rng, batch, seq):
  """Rows of 1-3 documents (ids 1, 2, ...) and then, sometimes, padding (id 0)."""
  rows = []
  for _ in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, seq), size=rng.integers(1, 4), replace=False))
    row = np.searchsorted(cuts, np.arange(seq), side="right") + 1
    if rng.random() < 0.5:
      row[cuts[-1]:] = 0
    rows.append(row)
  return np.stack(rows).astype(np.int32)


def positions_of(segment_ids):
  """Position of each token within its document (restarting at every id change)."""
  pos = np.zeros_like(segment_ids)
  for b, row in enumerate(segment_ids):
    for t in range(1, len(row)):
      pos[b, t] = 0 if row[t] != row[t - 1] else pos[b, t - 1] + 1
  return pos


def naive_attention(q, k, v, segment_ids, window=None, sinks=0):
  """One query at a time, in float64, straight from the definition; returns (out, lse)."""
  batch, seq, heads, head_dim = q.shape
  group = heads // k.shape[2]
  pos = positions_of(segment_ids)
  out = np.zeros(q.shape, np.float64)
  lse = np.zeros((batch, heads, seq), np.float64)
  for b in range(batch):
    for h in range(heads):
      for i in range(seq):
        seen = [j for j in range(i + 1) if segment_ids[b, j] == segment_ids[b, i]
                and (window is None or i - j < window or pos[b, j] < sinks)]
        s = np.array([q[b, i, h] @ k[b, j, h // group] for j in seen], np.float64)
        s = s / np.sqrt(head_dim)
        p = np.exp(s - s.max())
        out[b, i, h] = (p / p.sum()) @ v[b, seen, h // group].astype(np.float64)
        lse[b, h, i] = s.max() + np.log(p.sum())
  return out, lse


@pytest.mark.parametrize("window,sinks", [(None, 0), (3, 0), (4, 2)])
def test_matches_naive(rng, window, sinks):
  q, k, v = random_qkv(rng)
  seg = random_segments(rng, 2, 12)
  tokens = row_tokens(seg, positions_of(seg))
  out, lse = reference_attention(q, k, v, tokens, tokens, window=window, sinks=sinks)
  want_out, want_lse = naive_attention(q, k, v, seg, window, sinks)
  np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5, err_msg=f"segment_ids={seg}")
  np.testing.assert_allclose(lse, want_lse, atol=1e-5, rtol=1e-5)


def test_query_that_sees_nothing(rng):
  """A query block before every key (as in one block of ring attention): out 0, lse -inf."""
  q, k, v = random_qkv(rng, seq=4)
  seg = np.ones((2, 4), np.int32)
  q_tokens = row_tokens(seg)
  kv_tokens = q_tokens._replace(index=q_tokens.index + 4)
  out, lse = reference_attention(q, k, v, q_tokens, kv_tokens)
  np.testing.assert_array_equal(out, 0.0)
  assert np.all(np.isneginf(lse))


def test_gqa_equals_mha_with_repeated_kv(rng):
  q, k, v = random_qkv(rng, heads=6, kv_heads=2)
  seg = random_segments(rng, 2, 12)
  mha = attention(q, np.repeat(k, 3, axis=2), np.repeat(v, 3, axis=2), seg)
  np.testing.assert_allclose(attention(q, k, v, seg), mha, atol=1e-6)


def test_causal(rng):
  q, k, v = random_qkv(rng)
  seg = np.ones((2, 12), np.int32)
  t = int(rng.integers(1, 12))
  q2, k2, v2 = (x.copy() for x in (q, k, v))
  for x in (q2, k2, v2):
    x[:, t:] = rng.standard_normal(x[:, t:].shape)
  before = attention(q, k, v, seg)
  after = attention(q2, k2, v2, seg)
  np.testing.assert_array_equal(before[:, :t], after[:, :t], err_msg=f"t={t}")
  assert not np.allclose(before[:, t:], after[:, t:])


@pytest.mark.parametrize("perturbed", [1, 2])
def test_documents_do_not_see_each_other(rng, perturbed):
  q, k, v = random_qkv(rng, batch=1)
  seg = np.array([[1] * 5 + [2] * 4 + [0] * 3], np.int32)
  where = seg[0] == perturbed
  q2, k2, v2 = (x.copy() for x in (q, k, v))
  for x in (q2, k2, v2):
    x[:, where] = rng.standard_normal(x[:, where].shape)
  before = attention(q, k, v, seg)
  after = attention(q2, k2, v2, seg)
  np.testing.assert_array_equal(before[:, ~where], after[:, ~where])


def test_dtypes():
  q = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
  kv = jnp.ones((1, 4, 1, 8), jnp.bfloat16)
  assert attention(q, kv, kv, jnp.ones((1, 4), jnp.int32)).dtype == jnp.bfloat16


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_every_impl_through_the_dispatch(rng, impl):
  """`attention(impl=...)` runs each implementation on whole rows (Pallas in interpret mode)."""
  q, k, v = random_qkv(rng, seq=20, head_dim=16)
  seg = random_segments(rng, 2, 20)
  pos = positions_of(seg)
  want = attention(q, k, v, seg, pos, window=6, sinks=1, impl="reference")
  got = attention(q, k, v, seg, pos, window=6, sinks=1, impl=impl, block_q=16, block_kv=16)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_forced_pallas_with_unsupported_shapes_names_the_cause():
  q = jnp.ones((1, 4, 2, 512))  # head_dim beyond what the kernel takes
  with pytest.raises(ValueError, match="attention_impl='pallas' cannot run"):
    attention(q, q, q, jnp.ones((1, 4), jnp.int32), impl="pallas")


def test_unknown_impl():
  q = jnp.ones((1, 4, 2, 8))
  with pytest.raises(ValueError, match="reference"):
    attention(q, q, q, jnp.ones((1, 4), jnp.int32), impl="flash")
