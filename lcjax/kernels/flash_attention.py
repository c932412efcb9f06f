"""Flash attention in Pallas (forward and backward) for the mask shared with `attention.py`.

The kernels build the mask from the token arrays (segment id, causal index, in-document position)
with `Mask.visible`, so any token order works: ring attention's blocks, permuted (zigzag, striped) layouts. The
softmax runs online in float32; lse and "queries seeing nothing" follow the `attention.py`
contract.

Work is skipped per (q block, kv block) pair. Each block's ranges (`mask.Ranges`: min/max of
index and segment id, min position) tell when a pair cannot hold a visible key (`Mask.live`):
every key after every query, segment ranges disjoint, or every key outside the window and none a
sink. Such a pair is dead. Each q
block loops only from its first to its last live kv block (causal contiguous rows stop at the
diagonal, windows start late) and skips the dead blocks in between (between the sinks and the
window; the far half in zigzag layouts). The backward does the same from the kv side.

Two frames run the same per-block math:
- "gpu" (Triton): grid (batch, heads, q blocks). Each program loops over the kv blocks of the
  whole kv row. Block sizes are powers of two >= 16. head_dim is zero-padded to one.
- "tpu" (Mosaic): grid (batch, heads, q blocks, kv blocks) with the kv axis sequential and the
  softmax state in VMEM scratch. Dead pairs skip the compute. Index maps clamp to the live span
  from the scalar-prefetched schedule, so the pipeline skips their DMA too. Layouts follow JAX's
  shipped TPU kernels: row statistics replicated over 128 lanes, kv tokens over 8 sublanes.
  Blocks are multiples of 128. The schedule (7 int32 per block) sits in SMEM, which bounds the
  blocks per call.
Code: `mask.py` (the mask and the block ranges' test), `tiles.py` (the softmax and backward
math of a tile, padding), `flash_blocks.py` (the schedule, the plan of a call), `flash_gpu.py`,
`flash_tpu.py` (the two frames), and here the public API and the custom VJP.
JAX's splash attention is not used. It cannot express sinks by in-document position or permuted
token order, and the contract cannot tell statically which calls are plain causal rows.

Backward (flash-attention-2): delta = rowsum(dout * out) - dlse (float32). P is recomputed from
q, k and the given lse. So `out`/`lse` may be those of a larger attention, e.g. ring attention's
global ones. Rows with lse = -inf contribute nothing. dk/dv sum over the query heads of their kv
head inside the kernel (a loop on GPU, a sequential grid axis on TPU), with no repeat of k/v.
The cotangent of lse is supported: d lse / d scores = P, so it only shifts delta.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lcjax.kernels import tiles
from lcjax.kernels.flash_blocks import _plan, _prepare_tokens
from lcjax.kernels.flash_blocks import (
  supports as supports,  # re-exported: which shapes the kernel takes
)
from lcjax.kernels.flash_gpu import _gpu_bwd, _gpu_fwd
from lcjax.kernels.flash_tpu import _tpu_bwd, _tpu_fwd
from lcjax.kernels.mask import Mask, Tokens

# -- Public API ----------------------------------------------------------------------------------


def flash_fwd(q, k, v, q_tokens: Tokens, kv_tokens: Tokens, *, mask: Mask = Mask(),
              block_q: int = 128, block_kv: int = 128, backend: str | None = None,
              interpret: Any = False) -> tuple[jax.Array, jax.Array]:
  """Flash attention forward: (out like q, lse `[batch, heads, q_seq]` float32).

  Shapes, mask and lse as in `attention.py`. Sequences of any length are padded to the blocks
  inside. backend: "gpu", "tpu", or None for the default device's (Triton on CPU in interpret
  mode). interpret: True runs on CPU (the TPU frame in TPU interpret mode), or a
  `pltpu.InterpretParams`.
  """
  plan = _plan(q, k, v, mask=mask, block_q=block_q, block_kv=block_kv, backend=backend,
               interpret=interpret)
  q_tokens, kv_tokens, tables = _prepare_tokens(plan, q_tokens, kv_tokens)
  fwd = _gpu_fwd if plan.backend == "gpu" else _tpu_fwd
  out, lse = fwd(plan, q, k, v, q_tokens, kv_tokens, tables)
  return out[:, :plan.q_len], lse[:, :, :plan.q_len]


def flash_bwd(q, k, v, q_tokens: Tokens, kv_tokens: Tokens, out, lse, dout, *, dlse=None,
              mask: Mask = Mask(), block_q: int = 128, block_kv: int = 128,
              backend: str | None = None,
              interpret: Any = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Gradients (dq, dk, dv) of attention over these keys, given the row's out, lse, dout.

  out and lse `[batch, heads, q_seq]` may belong to a larger attention of the same queries (all
  kv blocks of ring attention): then these are this kv set's shares of the gradients. dlse, the
  cotangent of lse (None: zero), shifts delta. Other arguments as in `flash_fwd`.
  """
  plan = _plan(q, k, v, mask=mask, block_q=block_q, block_kv=block_kv, backend=backend,
               interpret=interpret)
  q_tokens, kv_tokens, tables = _prepare_tokens(plan, q_tokens, kv_tokens)
  delta = tiles.delta(out, dout, dlse)
  dout = dout.astype(q.dtype)  # a larger attention's out (and dout) may be float32
  pad_q = functools.partial(tiles.pad_axis, axis=1, size=plan.q_pad)
  q, dout = pad_q(q), pad_q(dout)
  k, v = (tiles.pad_axis(x, 1, plan.kv_pad) for x in (k, v))
  # Padded query rows see nothing: lse -inf makes their P zero.
  lse = tiles.pad_axis(lse.astype(tiles.f32), 2, plan.q_pad, -jnp.inf)
  delta = tiles.pad_axis(delta, 2, plan.q_pad)
  bwd = _gpu_bwd if plan.backend == "gpu" else _tpu_bwd
  dq, dk, dv = bwd(plan, q, k, v, q_tokens, kv_tokens, tables, dout, lse, delta)
  return dq[:, :plan.q_len], dk[:, :plan.kv_len], dv[:, :plan.kv_len]


class _Config(NamedTuple):
  mask: Mask
  block_q: int
  block_kv: int
  backend: str | None
  interpret: Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_tokens, kv_tokens, config):
  return flash_fwd(q, k, v, q_tokens, kv_tokens, **config._asdict())


def _flash_vjp_fwd(q, k, v, q_tokens, kv_tokens, config):
  out, lse = flash_fwd(q, k, v, q_tokens, kv_tokens, **config._asdict())
  return (out, lse), (q, k, v, q_tokens, kv_tokens, out, lse)


def _flash_vjp_bwd(config, residuals, cotangents):
  q, k, v, q_tokens, kv_tokens, out, lse = residuals
  dout, dlse = cotangents
  dq, dk, dv = flash_bwd(q, k, v, q_tokens, kv_tokens, out, lse, dout, dlse=dlse,
                         **config._asdict())
  return dq, dk, dv, None, None


_flash.defvjp(_flash_vjp_fwd, _flash_vjp_bwd)


def flash_attention(q, k, v, q_tokens: Tokens, kv_tokens: Tokens, *, mask: Mask = Mask(),
                    block_q: int = 128, block_kv: int = 128, backend: str | None = None,
                    interpret: Any = False) -> tuple[jax.Array, jax.Array]:
  """`flash_fwd` with the Pallas backward as its VJP (through both out and lse)."""
  config = _Config(mask, block_q, block_kv, backend, interpret)
  return _flash(q, k, v, q_tokens, kv_tokens, config)
