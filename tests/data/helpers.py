"""Shared helpers for the data tests: split packed rows back into documents, check the batch
contract and exact resume."""
import numpy as np

import lcjax.data as data

KEYS = ("inputs", "targets", "loss_weights", "segment_ids", "positions")


def documents(batches):
  """Yields (targets, loss_weights) of every document in the batches, in order."""
  for batch in batches:
    for row in range(batch["targets"].shape[0]):
      seg = batch["segment_ids"][row]
      for s in np.unique(seg[seg > 0]):
        yield batch["targets"][row][seg == s], batch["loss_weights"][row][seg == s]


def check_contract(batch, batch_size, length):
  """Asserts the batch contract on one batch (shapes, dtypes, invariants)."""
  assert set(batch) == set(KEYS)
  for k in KEYS:
    assert batch[k].shape == (batch_size, length), k
  assert batch["loss_weights"].dtype == np.float32
  for k in ("inputs", "targets", "segment_ids", "positions"):
    assert batch[k].dtype == np.int32, k
  pad = batch["segment_ids"] == 0
  assert np.all(batch["targets"][pad] == 0) and np.all(batch["targets"][~pad] != 0)
  assert np.all(batch["loss_weights"][pad] == 0)
  assert np.all(batch["positions"][pad] == 0)
  for row in range(batch_size):
    seg, pos = batch["segment_ids"][row], batch["positions"][row]
    tgt, inp = batch["targets"][row], batch["inputs"][row]
    for s in np.unique(seg[seg > 0]):
      where = np.nonzero(seg == s)[0]
      assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
      assert np.array_equal(pos[where], np.arange(len(where)))
      assert inp[where[0]] == 0
      assert np.array_equal(inp[where[1:]], tgt[where[:-1]])
    # Documents are numbered 1, 2, ... in order, then padding.
    real = seg[seg > 0]
    assert np.array_equal(np.unique(real), np.arange(1, real.max() + 1 if len(real) else 1))


def same(a, b):
  """Whether two lists of batches are equal, key by key."""
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
  )


def check_round_trip(cfg, batch_size, skip, check):
  """Asserts that a train iterator restored from its state after `skip` batches yields the
  `check` batches the uninterrupted run yields, and that the state is compact."""
  it = data.make_train_iterator(cfg, batch_size=batch_size)
  for _ in range(skip):
    next(it)
  state = it.state()
  assert isinstance(state, bytes) and len(state) < 1_000_000
  expected = [next(it) for _ in range(check)]
  fresh = data.make_train_iterator(cfg, batch_size=batch_size)
  fresh.restore(state)
  assert same([next(fresh) for _ in range(check)], expected)
  # Restoring rewinds an iterator that already moved past the state.
  it.restore(state)
  assert same([next(it) for _ in range(check)], expected)
