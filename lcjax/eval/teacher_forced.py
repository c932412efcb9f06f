"""Teacher-forced scoring at any length: answers to prompts, and loss by token position.

Teacher-forced: every scored token is predicted from the true tokens before it, in one forward
pass per batch, so a probe of any length costs one eval step (`lcjax.run.Setup.eval_step_at`
makes one for rows of `seq_len` tokens, sequence-sharded when the mesh has a `sequence` axis).
Everything here is numpy around that step; examples are plain token lists.

Each example is one row of the batch contract (DESIGN.md): one document starting at position
0, right-padded with segment 0; all-zero rows fill a batch to its `rows`.
"""

import math
from typing import Callable, Sequence

import numpy as np

EvalStep = Callable[[dict, dict], tuple[np.ndarray, np.ndarray]]


def _row_batch(examples: Sequence[tuple[Sequence[int], int]], seq_len: int, rows: int) -> dict:
  """A batch `[rows, seq_len]`, one row per (tokens, index of the first scored target): inputs
  tokens[:-1], targets tokens[1:], loss_weights 1 from that index on; all-zero rows after."""
  if len(examples) > rows:
    raise ValueError(f"{len(examples)} examples do not fit a batch of {rows} rows.")
  batch = {k: np.zeros((rows, seq_len), np.int32)
           for k in ("inputs", "targets", "segment_ids", "positions")}
  batch["loss_weights"] = np.zeros((rows, seq_len), np.float32)
  for row, (tokens, first_scored) in enumerate(examples):
    n = len(tokens) - 1
    batch["inputs"][row, :n] = tokens[:-1]
    batch["targets"][row, :n] = tokens[1:]
    batch["loss_weights"][row, first_scored:n] = 1.0
    batch["segment_ids"][row, :n] = 1
    batch["positions"][row, :n] = np.arange(n)
  return batch


def answer_batch(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int,
                 rows: int) -> dict:
  """(prompt tokens, target tokens) per row -> a batch `[rows, seq_len]` whose loss weights are
  1 on the target tokens only (inputs are (prompt + target)[:-1], so an example takes
  len(prompt) + len(target) - 1 positions)."""
  examples = []
  for i, (prompt, target) in enumerate(pairs):
    if not len(prompt) or not len(target):
      raise ValueError(f"Example {i}: the prompt and the target need at least one token each "
                       f"(got {len(prompt)} and {len(target)}).")
    length = len(prompt) + len(target) - 1
    if length > seq_len:
      raise ValueError(f"Example {i} takes {length} positions (prompt {len(prompt)} + target "
                       f"{len(target)} - 1), more than seq_len={seq_len}: score it with a "
                       f"longer seq_len or shorten it.")
    examples.append((np.concatenate([prompt, target]).astype(np.int32), len(prompt) - 1))
  return _row_batch(examples, seq_len, rows)


def _chunks(items: Sequence, rows: int):
  """items, `rows` at a time (the last chunk may be short: its batch is padded)."""
  if rows < 1:
    raise ValueError(f"rows={rows} must be >= 1.")
  for start in range(0, len(items), rows):
    yield items[start:start + rows]


def score_answers(eval_step: EvalStep, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                  seq_len: int, rows: int) -> list[dict]:
  """Per (prompt, target) example, in order: {"loss": mean cross-entropy over the target tokens,
  "token_accuracy": fraction of them that are the argmax, "exact_match": 1.0 if all are}.

  eval_step: `Setup.eval_step_at(seq_len)`; examples go `rows` to a batch."""
  results = []
  for chunk in _chunks(pairs, rows):
    batch = answer_batch(chunk, seq_len, rows)
    losses, correct = eval_step(params, batch)
    for row in range(len(chunk)):
      scored = batch["loss_weights"][row] > 0
      hits = np.asarray(correct[row][scored], bool)
      results.append({"loss": float(np.mean(losses[row][scored], dtype=np.float64)),
                      "token_accuracy": float(hits.mean()),
                      "exact_match": float(hits.all())})
  return results


def position_buckets(seq_len: int, num_buckets: int) -> list[tuple[int, int]]:
  """Log-spaced [start, end) token-position buckets covering 0..seq_len: the first is [0, 1),
  the last ends at seq_len, edges are distinct integers (min(num_buckets, seq_len) buckets;
  num_buckets=1 is the whole row)."""
  if seq_len < 1 or num_buckets < 1:
    raise ValueError(f"position_buckets needs seq_len >= 1 and num_buckets >= 1, got "
                     f"{seq_len} and {num_buckets}.")
  n = min(num_buckets, seq_len)  # every bucket holds at least one position
  if n == 1:
    return [(0, seq_len)]
  # Edges 1..seq_len geometrically spaced, each rounded, pushed past the previous one and kept
  # below seq_len by as many positions as buckets remain after it.
  edges = [0]
  for i, edge in enumerate(np.geomspace(1, seq_len, n)):
    lowest, highest = edges[-1] + 1, seq_len - (n - 1 - i)
    edges.append(int(min(max(round(edge), lowest), highest)))
  return list(zip(edges[:-1], edges[1:]))


def ppl_by_position(eval_step: EvalStep, params, documents: Sequence[Sequence[int]], seq_len: int,
                    rows: int, num_buckets: int) -> list[dict]:
  """Loss by token position at length seq_len, averaged over documents per position bucket.

  Each document's first seq_len + 1 tokens are one row (every position scored: the token at
  position p is predicted from the p + 1 before it); documents shorter than that are skipped,
  and no long enough document gives []. Rows, one per `position_buckets(seq_len, num_buckets)`
  bucket: {"length": seq_len, "position_start", "position_end" (the bucket [start, end)),
  "position": its geometric centre sqrt(max(start, 1) * end), "loss": mean loss over the
  bucket's tokens of every document, "tokens": how many}. eval_step: `Setup.eval_step_at(seq_len)`.
  """
  # 1. The documents long enough, cut to one row each.
  kept = [np.asarray(d[:seq_len + 1], np.int32) for d in documents if len(d) >= seq_len + 1]
  if not kept:
    return []
  # 2. Per-position loss sums over the documents, a batch of `rows` at a time.
  loss_sum = np.zeros(seq_len, np.float64)
  for chunk in _chunks(kept, rows):
    losses, _ = eval_step(params, _row_batch([(d, 0) for d in chunk], seq_len, rows))
    loss_sum += np.asarray(losses[:len(chunk)], np.float64).sum(axis=0)
  # 3. Per bucket.
  results = []
  for start, end in position_buckets(seq_len, num_buckets):
    tokens = len(kept) * (end - start)
    results.append({"length": seq_len, "position_start": start, "position_end": end,
                    "position": math.sqrt(max(start, 1) * end),
                    "loss": float(loss_sum[start:end].sum() / tokens), "tokens": tokens})
  return results
