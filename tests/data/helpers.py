"""Shared helpers for the data tests: split packed rows back into documents."""
import numpy as np

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
