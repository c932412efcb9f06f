"""Mixtures by token share: rates that give each task a share of the training *tokens* (what
ProLong-style recipes specify: 30% code repositories, 30% books, ...), not of the examples, so
that long and short documents mix as intended.

A TokenShareMixture becomes a seqio Mixture whose rate for task i is share_i / mean_i, mean_i
being the mean tokens of task i's first `sample_examples` training examples in this process's
stream (windows of long documents count as the examples they are). Registered per process when
its train iterator is built, since each process's share of a corpus has its own mean.
"""
import dataclasses

import gin
import numpy as np
import seqio
import tensorflow as tf

from lcjax.config import check_types
from lcjax.errors import ConfigError


@gin.configurable
@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenShareMixture:
  """name: the seqio mixture's name (for DataConfig.train_mixture); shares: (task, share of
  the training tokens) pairs, normalized to sum to 1; sample_examples: examples per task that
  estimate its mean tokens per example; report_batches: batches over which the realised shares
  are printed when a train iterator is built (0: not reported)."""
  name: str
  shares: tuple[tuple[str, float], ...]
  sample_examples: int = 256
  report_batches: int = 100

  def __post_init__(self):
    check_types(self)  # a wrong-typed gin binding fails here, naming it
    object.__setattr__(self, "shares", tuple((t, float(s)) for t, s in self.shares))
    what = f"TokenShareMixture {self.name!r}"
    names = [t for t, _ in self.shares]
    if not self.shares or len(set(names)) < len(names) or any(s <= 0 for _, s in self.shares):
      raise ConfigError(f"{what}.shares={self.shares} must name each task once with a "
                        "positive share, e.g. [('books', 0.3), ('code', 0.7)].")
    if self.sample_examples < 1 or self.report_batches < 0:
      raise ConfigError(f"{what}: sample_examples must be >= 1 and report_batches >= 0.")

  @property
  def targets(self) -> dict[str, float]:
    """Task -> share of the tokens, summing to 1."""
    total = sum(s for _, s in self.shares)
    return {t: s / total for t, s in self.shares}


def _sizes(task: seqio.Task, lengths, seed: int, shard: seqio.ShardInfo) -> tf.data.Dataset:
  """Tokens of each example of a task's training stream, as Mixture.get_dataset draws it."""
  ds = task.get_dataset(sequence_length=lengths, split="train", shuffle=True, seed=seed,
                        shard_info=shard, num_epochs=None)
  return ds.map(lambda ex: tf.size(ex["targets"]))


def register(mixture: TokenShareMixture, lengths, seed: int, shard: seqio.ShardInfo) -> None:
  """(Re)registers the seqio Mixture of `mixture` for this process's shard (module doc)."""
  known = set(seqio.TaskRegistry.names())
  for task in mixture.targets:
    if task not in known:
      raise ConfigError(f"TokenShareMixture {mixture.name!r} names task {task!r}, which is not "
                        f"registered. Fix: use one of {sorted(known)} (DataConfig.sources add "
                        "yours).")
  rates = []
  for task, share in mixture.targets.items():
    sizes = _sizes(seqio.get_mixture_or_task(task), lengths, seed, shard)
    mean = np.mean([int(n) for n in sizes.take(mixture.sample_examples).as_numpy_iterator()])
    rates.append((task, share / mean))
  seqio.MixtureRegistry.remove(mixture.name)
  seqio.MixtureRegistry.add(mixture.name, rates)


def realised_shares(mixture: TokenShareMixture, lengths, seed: int, shard: seqio.ShardInfo,
                    tokens: int) -> dict[str, float]:
  """Each task's share of the first `tokens` tokens of the registered mixture's stream (this
  process's examples, drawn with its rates and seed as seqio's Mixture draws them)."""
  registered = seqio.get_mixture_or_task(mixture.name)
  tags = [_sizes(task, lengths, seed, shard).map(lambda n, i=i: (i, n))
          for i, task in enumerate(registered.tasks)]
  rates = [registered.get_rate(task) for task in registered.tasks]
  counts, total = np.zeros(len(tags)), 0
  for i, n in tf.data.Dataset.sample_from_datasets(tags, rates, seed,
                                                   stop_on_empty_dataset=True):
    counts[int(i)] += int(n)
    total += int(n)
    if total >= tokens:
      break
  return {task.name: counts[i] / max(total, 1) for i, task in enumerate(registered.tasks)}


def report(mixture: TokenShareMixture, lengths, seed: int, shard: seqio.ShardInfo,
           batch_size: int) -> None:
  """Prints the realised shares over the first report_batches batches, beside the targets."""
  if not mixture.report_batches:
    return
  tokens = mixture.report_batches * batch_size * max(lengths.values())
  got = realised_shares(mixture, lengths, seed, shard, tokens)
  parts = ", ".join(f"{t} {got[t]:.3f} (target {s:.3f})" for t, s in mixture.targets.items())
  print(f"Token shares of mixture {mixture.name!r} over its first {mixture.report_batches} "
        f"batches (process {shard.index} of {shard.num_shards}): {parts}", flush=True)
