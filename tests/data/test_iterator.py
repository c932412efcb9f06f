import numpy as np

import lcjax.data as data
from tests.data.helpers import check_round_trip, documents, same


def test_state_round_trip_is_exact_for_the_mixture():
  cfg = data.DataConfig(train_mixture="lcjax_demo", sequence_length=512, seed=7)
  check_round_trip(cfg, batch_size=8, skip=5, check=6)


def test_state_round_trip_is_exact_with_the_anchor():
  """The partial row in the checkpoint starts with the anchor; positions run on."""
  cfg = data.DataConfig(train_mixture="lcjax_demo", sequence_length=512, seed=3, anchor=True,
                        continuous_positions=True)
  check_round_trip(cfg, batch_size=2, skip=3, check=3)


def test_seed_changes_order_and_same_seed_repeats():
  a = data.make_train_iterator(data.DataConfig(seed=1), batch_size=4)
  b = data.make_train_iterator(data.DataConfig(seed=1), batch_size=4)
  c = data.make_train_iterator(data.DataConfig(seed=2), batch_size=4)
  first = [next(a) for _ in range(2)]
  assert same(first, [next(b) for _ in range(2)])
  assert not same(first, [next(c) for _ in range(2)])


def test_shards_are_disjoint_and_cover_the_data(gin_bindings):
  n = 40
  gin_bindings(**{"MqarConfig.num_train": n})
  cfg = data.DataConfig(train_mixture="lcjax_mqar", sequence_length=512)
  # MQAR documents fill one row each, so a batch of n rows is one epoch.
  everything = {tuple(t) for t, _ in documents([next(data.make_train_iterator(cfg, n))])}
  assert len(everything) == n  # one epoch, each example once
  shards = []
  for index in range(2):
    it = data.make_train_iterator(cfg, batch_size=n // 2, shard_index=index, num_shards=2)
    shards.append({tuple(t) for t, _ in documents([next(it)])})
  assert len(shards[0]) == len(shards[1]) == n // 2
  assert not shards[0] & shards[1]
  assert shards[0] | shards[1] == everything


def test_eval_batches_are_deterministic():
  cfg = data.DataConfig(sequence_length=512)
  for task in cfg.eval_tasks:
    a = data.make_eval_batches(cfg, task, batch_size=4, num_batches=3)
    b = data.make_eval_batches(cfg, task, batch_size=4, num_batches=3)
    assert len(a) == 3 and same(a, b)


def test_per_document_weights_make_every_document_weigh_one():
  import tensorflow as tf

  from lcjax.data.pipeline import per_document_weights

  segments = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], np.int32)
  weights = np.array([[0, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 1]], np.float32)
  out = per_document_weights({"loss_weights": tf.constant(weights),
                              "segment_ids": tf.constant(segments)})["loss_weights"].numpy()
  np.testing.assert_allclose(out, [[0, .5, .5, .5, .5, 0], [.25, .25, .25, 0, 0, .25]])


def test_documents_normalization_reaches_the_train_batches(gin_bindings):
  cfg = data.DataConfig(sequence_length=512, loss_normalization="documents")
  batch = next(data.make_train_iterator(cfg, batch_size=4))
  for row in range(4):
    for seg in np.unique(batch["segment_ids"][row]):
      total = batch["loss_weights"][row][batch["segment_ids"][row] == seg].sum()
      assert np.isclose(total, 0.0 if seg == 0 else 1.0), (row, seg, total)
