"""Dataset Decomposition: pieces, bucket order, batches of constant tokens, exact resume."""

import numpy as np
import pytest
import tensorflow as tf

from lcjax.data import buckets as B
from lcjax.data import pipeline, tasks
from lcjax.errors import ConfigError
from tests.data.helpers import check_contract

LENGTHS = (16, 32, 64)
TASK = "test_buckets_documents"


def _register_documents(lengths: np.ndarray) -> None:
  """A task whose documents are 1..n-counting token runs of the given lengths (ids 3..)."""
  def dataset_fn(split, shuffle_files, seed=None):
    del split
    sizes = tf.constant(lengths, tf.int32)
    index = tasks.index_stream(len(lengths), shuffle_files, seed)
    return index.map(lambda i: {"targets": tf.range(sizes[i], dtype=tf.int32) % 250 + 3,
                                "loss_mask": tf.ones([sizes[i]], tf.int32)})

  source = tasks._SelfShuffledSource(dataset_fn, splits=("train",))
  features = tasks.output_features(pipeline.DataConfig())
  tasks.register_task(TASK, source, [], features, answers=False)


@pytest.mark.parametrize("lengths", [(4, 8, 16), (16,), (8, 32)])
def test_tf_pieces_match_the_definition(lengths):
  for n in [0, 3, 4, 7, 8, 12, 16, 17, 29, 31, 33, 50, 100]:
    doc = {"targets": tf.range(n, dtype=tf.int32), "loss_mask": tf.ones([n], tf.int32)}
    got = sorted((int(p["targets"][0]), int(p["targets"][0]) + len(p["targets"]))
                 for length in lengths
                 for p in B._pieces_of_length(doc, length, lengths).as_numpy_iterator())
    expected = B.piece_bounds(n, lengths)
    assert got == expected, n
    # Contiguous from the front, each a bucket's length, largest first after the full ones.
    assert all(b[0] == a[1] for a, b in zip(expected, expected[1:]))
    assert all(end - start in lengths for start, end in expected)
    assert [e - s for s, e in expected] == sorted([e - s for s, e in expected], reverse=True)


def test_binary_decomposition_keeps_every_bit_above_the_shortest():
  assert B.piece_bounds(29, (4, 8, 16)) == [(0, 16), (16, 24), (24, 28)]  # 29 = 16+8+4+1
  assert B.piece_bounds(50, (4, 8, 16)) == [(0, 16), (16, 32), (32, 48)]  # 3 full, 2 dropped


def test_bucket_order_counts_and_curriculum():
  shares, steps, cycles = np.array([0.25, 0.25, 0.5]), 400, 2
  pow2 = B.LengthBuckets(lengths=LENGTHS).bucket_odds
  assert pow2.tolist() == [4.0, 2.0, 1.0]
  order = B.bucket_order(shares, pow2, steps, cycles, seed=0)
  assert order.shape == (steps,) and order.dtype == np.int32
  assert np.array_equal(order, B.bucket_order(shares, pow2, steps, cycles, seed=0))
  for cycle in order.reshape(cycles, -1):
    assert np.bincount(cycle, minlength=3).tolist() == [50, 50, 100]  # the token shares
    # Short buckets, at higher odds, run out first: each cycle grows from short to long.
    assert cycle[:50].mean() < 1.0 < cycle[-50:].mean()
  flat = B.bucket_order(shares, np.ones(3), steps, 1, seed=0)
  assert abs(flat[:200].mean() - flat[200:].mean()) < 0.3  # equal odds: no drift


def test_config_errors():
  with pytest.raises(ConfigError, match="powers of two"):
    pipeline.DataConfig(sequence_length=48, length_buckets=(16, 48))
  with pytest.raises(ConfigError, match="one positive number per bucket"):
    pipeline.DataConfig(sequence_length=32, length_buckets=(16, 32), bucket_odds=(1.0,))
  with pytest.raises(ConfigError, match="must end at DataConfig.sequence_length=128"):
    pipeline.DataConfig(sequence_length=128, length_buckets=(16, 32))
  with pytest.raises(ConfigError, match="anchor and continuous_positions do not apply"):
    pipeline.DataConfig(sequence_length=32, length_buckets=(16, 32), anchor=True)


def _dataset(steps=64, seed=0):
  buckets = pipeline.DataConfig(sequence_length=64, length_buckets=LENGTHS).buckets
  return B.make_bucketed_dataset(TASK, buckets, sequence_length=64, batch_size=2, steps=steps,
                                 seed=seed, normalize=pipeline.per_document_weights)


def test_batches_hold_constant_tokens_and_whole_pieces():
  rng = np.random.default_rng(0)
  _register_documents(rng.integers(1, 200, size=64))
  seen = set()
  for batch in _dataset().take(24).as_numpy_iterator():
    rows, length = batch["targets"].shape
    assert length in LENGTHS and rows * length == 2 * 64
    check_contract(batch, rows, length)
    assert np.all(batch["segment_ids"] == 1)  # one piece per row, no padding
    # A piece is a contiguous run of its document: consecutive ids (mod the 250 wrap).
    steps = (np.diff(batch["targets"], axis=1) - 1) % 250
    assert np.all(steps == 0)
    # "documents" normalization: each row's weights sum to one.
    np.testing.assert_allclose(batch["loss_weights"].sum(1), 1.0, rtol=1e-6)
    seen.add(length)
  assert seen == set(LENGTHS)


def test_iterator_state_resumes_exactly_across_lengths():
  _register_documents(np.random.default_rng(1).integers(1, 200, size=64))
  it = pipeline.BatchIterator(_dataset())
  for _ in range(5):
    next(it)
  state = it.state()
  expected = [next(it) for _ in range(8)]
  assert len({b["targets"].shape for b in expected}) > 1
  fresh = pipeline.BatchIterator(_dataset())
  fresh.restore(state)
  for a, b in zip(expected, [next(fresh) for _ in range(8)]):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_too_short_documents_are_a_config_error():
  _register_documents(np.full(8, 10))
  with pytest.raises(ConfigError, match="shortest bucket"):
    _dataset()


def test_documents_longer_than_the_longest_bucket_are_cut_not_trimmed():
  _register_documents(np.full(4, 200))  # 3 pieces of 64, then 8 tokens dropped
  batches = list(_dataset().take(8).as_numpy_iterator())
  assert {b["targets"].shape[1] for b in batches} == {64}
  firsts = {int(t) for b in batches for t in b["targets"][:, 0]}
  assert firsts == {3, 3 + 64, 3 + 128}  # each document's three pieces (ids count from 3)
