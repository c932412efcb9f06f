"""Held-out metrics: loss, perplexity, token accuracy and, for prompt -> answer tasks, exact
match of the answer tokens."""

import math

import numpy as np

from lcjax.data.tasks import has_answers


def exact_matches(correct: np.ndarray, batch: dict) -> tuple[int, int]:
  """(documents whose every loss-weighted token is predicted right, documents with any).

  Teacher-forced: each answer token is predicted from the true previous tokens, the usual
  exact-match protocol for passkey and MQAR.
  """
  hits = total = 0
  weighted = batch["loss_weights"] > 0
  for row in range(correct.shape[0]):
    for seg in np.unique(batch["segment_ids"][row][weighted[row]]):
      mask = weighted[row] & (batch["segment_ids"][row] == seg)
      hits += bool(correct[row][mask].all())
      total += 1
  return hits, total


def evaluate(eval_step, params, batches_by_task: dict) -> dict[str, float]:
  """Runs `eval_step(params, host batch) -> host (losses, correct)` (`lcjax.run.build` makes
  one) over each task's batches; keys are `eval/<task>/<metric>`. Exact match is reported for
  the tasks registered as prompt -> answer (`lcjax.data.tasks.has_answers`)."""
  results = {}
  for task, batches in batches_by_task.items():
    loss_sum = weight_sum = correct_sum = 0.0
    hits = docs = 0
    for batch in batches:
      losses, correct = eval_step(params, batch)
      w = batch["loss_weights"].astype(np.float64)
      loss_sum += float((losses * w).sum())
      correct_sum += float((correct * w).sum())
      weight_sum += float(w.sum())
      h, d = exact_matches(np.asarray(correct), batch)
      hits, docs = hits + h, docs + d
    if weight_sum == 0:
      continue
    loss = loss_sum / weight_sum
    results[f"eval/{task}/loss"] = loss
    results[f"eval/{task}/ppl"] = math.exp(min(loss, 50.0))
    results[f"eval/{task}/token_accuracy"] = correct_sum / weight_sum
    if has_answers(task):
      results[f"eval/{task}/exact_match"] = hits / max(docs, 1)
  return results
