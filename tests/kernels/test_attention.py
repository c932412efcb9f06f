import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.kernels.attention import (
  ATTENTION,
  IMPLS,
  attention,
  decode_attention,
  reference_attention,
)
from lcjax.kernels.mask import Mask, row_tokens
from tests.numerics import F32, assert_close, positions_of, random_qkv, random_segments


def naive_mask(segment_ids, window=None, sinks=0):
  """bool `[batch, seq, seq]` straight from the definition in `lcjax.kernels.mask`'s doc."""
  batch, seq = segment_ids.shape
  pos = positions_of(segment_ids)
  seen = np.zeros((batch, seq, seq), bool)
  for b in range(batch):
    for i in range(seq):
      for j in range(i + 1):
        seen[b, i, j] = segment_ids[b, j] == segment_ids[b, i] and (
            window is None or i - j < window or pos[b, j] < sinks)
  return seen


def naive_attention(q, k, v, seen, dout=None, dlse=None):
  """One query at a time, in float64, from `seen` `[batch, q_seq, kv_seq]`: (out, lse), and with
  cotangents dout (like q) and dlse (`[batch, heads, q_seq]`), also (dq, dk, dv)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, q_seq, heads, head_dim = q.shape
  group = heads // k.shape[2]
  out, lse = np.zeros(q.shape), np.full((batch, heads, q_seq), -np.inf)
  dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
  for b in range(batch):
    for h in range(heads):
      for i in range(q_seq):
        js = np.flatnonzero(seen[b, i])
        if not len(js):
          continue
        kj, vj = k[b, js, h // group], v[b, js, h // group]
        s = kj @ q[b, i, h] / np.sqrt(head_dim)
        p = np.exp(s - s.max())
        lse[b, h, i] = s.max() + np.log(p.sum())
        p /= p.sum()
        out[b, i, h] = p @ vj
        if dout is not None:
          dp = vj @ np.asarray(dout[b, i, h], np.float64)
          ds = p * (dp - p @ dp + float(dlse[b, h, i])) / np.sqrt(head_dim)
          dq[b, i, h] = ds @ kj
          dk[b, js, h // group] += ds[:, None] * q[b, i, h]
          dv[b, js, h // group] += p[:, None] * np.asarray(dout[b, i, h], np.float64)
  return (out, lse) if dout is None else (out, lse, dq, dk, dv)


@pytest.mark.parametrize("window,sinks", [(None, 0), (3, 0), (4, 2)])
def test_matches_naive(rng, window, sinks):
  q, k, v = random_qkv(rng, q_seq=12)
  seg = random_segments(rng, 2, 12)
  tokens = row_tokens(seg, positions_of(seg))
  out, lse = reference_attention(q, k, v, tokens, tokens, mask=Mask(window, sinks))
  want_out, want_lse = naive_attention(q, k, v, naive_mask(seg, window, sinks))
  assert_close(out, want_out, F32, f"out (segment_ids={seg})")
  assert_close(lse, want_lse, F32, "lse")


def test_query_that_sees_nothing(rng):
  """A query block before every key (as in one block of ring attention): out 0, lse -inf."""
  q, k, v = random_qkv(rng, q_seq=4)
  seg = np.ones((2, 4), np.int32)
  q_tokens = row_tokens(seg)
  kv_tokens = q_tokens._replace(index=q_tokens.index + 4)
  out, lse = reference_attention(q, k, v, q_tokens, kv_tokens)
  np.testing.assert_array_equal(out, 0.0)
  assert np.all(np.isneginf(lse))


def test_gqa_equals_mha_with_repeated_kv(rng):
  q, k, v = random_qkv(rng, q_seq=12, heads=6, kv_heads=2)
  seg = random_segments(rng, 2, 12)
  mha = attention(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2), seg)
  np.testing.assert_allclose(attention(q, k, v, seg), mha, atol=1e-6)


def test_causal(rng):
  q, k, v = (np.array(x) for x in random_qkv(rng, q_seq=12))
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
  q, k, v = (np.array(x) for x in random_qkv(rng, batch=1, q_seq=12))
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
  """`attention(impl=...)` runs each implementation on whole rows (Pallas in interpret mode),
  against the float64 loop."""
  q, k, v = random_qkv(rng, q_seq=20, head_dim=16)
  seg = random_segments(rng, 2, 20)
  pos = positions_of(seg)
  mask = Mask(window=6, sinks=1)
  want, _ = naive_attention(q, k, v, naive_mask(seg, 6, 1))
  got = attention(q, k, v, seg, pos, mask=mask, impl=impl, block_q=16, block_kv=16)
  assert_close(got, want, F32, f"{impl} (segment_ids={seg})")


def test_auto_is_blockwise():
  assert ATTENTION.resolve("auto") == "blockwise"


@pytest.mark.parametrize("mask", [Mask(), Mask(window=5), Mask(window=4, sinks=2)])
def test_decode_matches_the_last_query_of_a_prefix(rng, mask):
  """decode_attention over a cache whose first `length` slots hold a prefix equals the last
  query of reference attention over that prefix; slots after it (garbage here) are unseen."""
  max_len, length = 16, int(rng.integers(1, 17))
  q, k, v = random_qkv(rng, q_seq=max_len)
  tokens = row_tokens(jnp.ones((2, length), jnp.int32))
  want, _ = reference_attention(q[:, :length], k[:, :length], v[:, :length], tokens, tokens,
                                mask=mask)
  got = decode_attention(q[:, length - 1:length], k, v, jnp.int32(length), mask=mask)
  assert_close(got, want[:, -1:], F32, f"length={length}")


def test_forced_pallas_with_unsupported_shapes_names_the_cause():
  q = jnp.ones((1, 4, 2, 512))  # head_dim beyond what the kernel takes
  with pytest.raises(ValueError, match="attention impl 'pallas' cannot run"):
    attention(q, q, q, jnp.ones((1, 4), jnp.int32), impl="pallas")


def test_unknown_impl():
  q = jnp.ones((1, 4, 2, 8))
  with pytest.raises(ValueError, match="reference"):
    attention(q, q, q, jnp.ones((1, 4), jnp.int32), impl="flash")


def test_mask_arguments_are_checked():
  with pytest.raises(ValueError, match="window=0 must be >= 1"):
    Mask(window=0)
  with pytest.raises(ValueError, match="sinks=-1 must be >= 0"):
    Mask(window=4, sinks=-1)
  with pytest.raises(ValueError, match="group=0 must be >= 1"):
    Mask(group=0)
  with pytest.raises(ValueError, match=r"group_shift=4 must be in \[0, group=4\)"):
    Mask(group=4, group_shift=4)
  with pytest.raises(ValueError, match="group_shift=1 must be in"):
    Mask(group_shift=1)

