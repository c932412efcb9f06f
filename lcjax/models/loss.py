"""The LM's per-token loss: what training minimises and evaluation scores.

The loss takes the model's hidden states and head (`LM.hidden`, `LM.head_weights`) rather than
its logits, so that it can cut the sequence into chunks (`lcjax.kernels.losses`) and never hold
the whole float32 `[batch, seq, vocab]` logits; `ModelConfig.loss_chunk` says when.
"""

import functools

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from lcjax.kernels.losses import chunked_cross_entropy, cross_entropy
from lcjax.parallel.mesh import axes_size, present_axes
from lcjax.parallel.sequence import SequenceSharding

# "auto" chunks when the whole float32 logits (per device) would exceed this, into chunks whose
# logits fit in it. 256 MiB is a few percent of an accelerator's memory, so the few chunk-sized
# float32 buffers of the backward (logits, probabilities, their gradient) stay small, while a
# chunk still has >= 256 rows (batch x chunk) at a 256K vocabulary, >= 2048 at 32K, to keep
# its matmuls efficient. Below it the plain loss is one matmul, with little memory to save.
AUTO_LOGITS_BYTES = 256 * 2**20


def chunk_length(setting: int | str, batch: int, seq: int, vocab: int) -> int:
  """`ModelConfig.loss_chunk` for logits `[batch, seq, vocab]` -> the chunk length in tokens,
  0 for the plain loss. "auto" picks a power of two (chunks then tile a power-of-two row)."""
  if setting == "off":
    return 0
  if setting != "auto":
    return setting
  if batch * seq * vocab * 4 <= AUTO_LOGITS_BYTES:
    return 0
  fits = max(AUTO_LOGITS_BYTES // (batch * vocab * 4), 1)
  return 1 << (fits.bit_length() - 1)


def head_losses(hidden: jax.Array, head: jax.Array, targets: jax.Array, setting: int | str,
                sequence: SequenceSharding | None = None) -> tuple[jax.Array, jax.Array]:
  """hidden `[batch, seq, d]`, head `[d, vocab]`, targets `[batch, seq]` -> (per-token
  cross-entropy `[batch, seq]` float32, argmax predictions `[batch, seq]` int32), plain or
  chunked as `setting` (`ModelConfig.loss_chunk`) says.

  With the rows split over devices (`sequence`), each device chunks its own tokens inside
  `shard_map`, and "auto" judges each device's share of the logits. A loop of dynamic slices
  over the sharded sequence would make XLA gather the whole row's hidden states onto every
  device (seen on 8 CPU devices: all-gathers, then every device runs every chunk). Inside
  `shard_map` the head's gradient is also summed over devices once, after the loop. Each
  device gets the whole head (gathered where the rules split it over fsdp or tensor; the plain
  loss can keep a tensor-split vocabulary split).

  Without `sequence` the loss does not know the mesh: a batch split over data axes then has
  XLA all-reduce the head's gradient once per chunk rather than once per step (seen on 8 CPU
  devices), more bytes on the wire for the memory saved.
  """
  batch, seq = targets.shape
  if sequence is not None:
    mesh = sequence.mesh
    batch_axes = present_axes(mesh, sequence.batch_axes)
    batch, seq = batch // axes_size(mesh, batch_axes), seq // sequence.shards
  chunk = chunk_length(setting, batch, seq, head.shape[1])
  if not chunk:  # per-token work: with rows split, XLA splits the logits like the rest
    return cross_entropy(hidden, head, targets)
  if sequence is None:
    return chunked_cross_entropy(hidden, head, targets, chunk)
  rows = P(batch_axes, sequence.seq_axis)
  return jax.shard_map(functools.partial(chunked_cross_entropy, chunk=chunk), mesh=mesh,
                       in_specs=(P(*rows, None), P(), rows), out_specs=(rows, rows))(
                           hidden, head, targets)


def token_losses(graphdef, params, batch) -> tuple[jax.Array, jax.Array]:
  """Per-token cross-entropy [batch, seq] float32 and the argmax predictions [batch, seq].

  `params` is the model's `nnx.to_pure_dict` form, merged with `graphdef` while tracing;
  `batch` holds "inputs", "targets", "segment_ids", "positions", each [batch, seq].
  """
  model = nnx.merge(graphdef, params)
  hidden = model.hidden(batch["inputs"], batch["segment_ids"], batch["positions"])
  return head_losses(hidden, model.head_weights(), batch["targets"], model.config.loss_chunk,
                     model.sequence)
