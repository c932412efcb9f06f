"""Masked attention: the mask every implementation shares, the reference, and the dispatch.

Every attention implementation has the signature
`fn(q, k, v, q_tokens, kv_tokens, *, window, sinks) -> (out, lse)` and the same mask, so the
model calls `attention` and never knows which one ran; ring attention (`lcjax.parallel`) calls
the same functions on blocks and merges them by their log-sum-exp.

Shapes: q `[batch, q_seq, heads, head_dim]`; k, v `[batch, kv_seq, kv_heads, head_dim]` with
heads % kv_heads == 0 (grouped-query: query head h reads kv head h // (heads // kv_heads));
out like q; lse `[batch, heads, q_seq]` float32, the natural log of the sum over visible keys of
exp(q.k / sqrt(head_dim)), -inf for a query that sees no key (out is 0 there).

The mask is `lcjax.kernels.mask.visible`: causal by each token's original index, within its
document, optionally a sliding window with sink tokens.

Implementations (`IMPLS`): "reference" (materialises the scores; the ground truth), "blockwise"
(flash-style tiles in plain JAX: O(block^2) memory, any backend), "pallas" (the Pallas flash
kernel: Triton on GPU, Mosaic on TPU, interpret mode on CPU), "xla" (`jax.nn.dot_product_attention`,
cuDNN on GPU where it applies; gives no lse). "auto" picks per backend (`AUTO`).
"""

import jax
import jax.numpy as jnp

from lcjax.kernels import blockwise_attention, flash_attention
from lcjax.kernels.mask import Tokens, check_mask_args, row_tokens, visible


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_tokens: Tokens,
                        kv_tokens: Tokens, *, window: int | None = None,
                        sinks: int = 0) -> tuple[jax.Array, jax.Array]:
  """Materialises the `[q_seq, kv_seq]` scores; float32 scores, softmax and sums."""
  batch, q_seq, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}.")
  f32 = jnp.float32
  # Group query heads by the kv head they share: h = kv * group + g.
  qg = q.reshape(batch, q_seq, kv_heads, heads // kv_heads, head_dim).astype(f32)
  # Scale q and normalise the output rather than the [q_seq, kv_seq] scores and probabilities.
  scores = jnp.einsum("bqkgd,bskd->bkgqs", qg / jnp.sqrt(f32(head_dim)), k.astype(f32))
  mask = visible(q_tokens, kv_tokens, window=window, sinks=sinks)[:, None, None]
  scores = jnp.where(mask, scores, -jnp.inf)
  # The max only shifts for stability (it cancels); rows that see nothing keep a finite shift.
  row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1))  # [b, kv_heads, group, q]
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  probs = jnp.exp(scores - row_max[..., None])
  total = jnp.sum(probs, axis=-1)
  seen = total > 0
  total = jnp.where(seen, total, 1.0)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(f32))
  out = out / jnp.moveaxis(total, 3, 1)[..., None]
  lse = jnp.where(seen, row_max + jnp.log(total), -jnp.inf)
  return (out.reshape(batch, q_seq, heads, head_dim).astype(q.dtype),
          lse.reshape(batch, heads, q_seq))


def _pallas(q, k, v, q_tokens, kv_tokens, *, window, sinks, block_q=128, block_kv=128):
  # On CPU there is no Pallas compiler: interpret mode (slow; for tests).
  return flash_attention.flash_attention(q, k, v, q_tokens, kv_tokens, window=window,
                                         sinks=sinks, block_q=block_q, block_kv=block_kv,
                                         interpret=jax.default_backend() == "cpu")


def _xla(q, k, v, q_tokens, kv_tokens, *, window, sinks):
  """XLA's fused attention (cuDNN on GPU when it takes the shapes); no lse."""
  mask = visible(q_tokens, kv_tokens, window=window, sinks=sinks)[:, None]  # [b, 1, q, kv]
  return jax.nn.dot_product_attention(q, k, v, mask=mask), None


# Implementations that work in tiles take block_q / block_kv.
TILED = ("blockwise", "pallas")

IMPLS = {
    "reference": reference_attention,
    "blockwise": blockwise_attention.blockwise_attention,
    "pallas": _pallas,
    "xla": _xla,
}

# What "auto" runs on each backend. The Pallas kernel passes its interpret-mode tests and lowers
# for Triton and Mosaic, but has not yet been run on a GPU or TPU (bench/README.md): until its
# device table is taken it is opt-in (attention_impl="pallas"), not the default.
AUTO = {"cpu": "reference", "gpu": "xla", "tpu": "xla"}


def resolve_impl(impl: str, q=None, k=None, v=None, **tiles) -> str:
  """The implementation to run for `impl` ("auto": the backend's choice in AUTO).

  Fails, naming the cause, if `impl` is unknown or is "pallas" and the kernel cannot take
  q, k, v (`flash_attention.supports`).
  """
  if impl == "auto":
    impl = AUTO.get(jax.default_backend(), "reference")
  if impl not in IMPLS:
    raise ValueError(f"Unknown attention impl {impl!r}; choose one of "
                     f"{['auto'] + sorted(IMPLS)}.")
  if impl == "pallas" and q is not None:
    reason = flash_attention.supports(q, k, v, **tiles)
    if reason:
      raise ValueError(f"attention_impl='pallas' cannot run these shapes: {reason} Choose "
                       f"another attention_impl (e.g. 'auto').")
  return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
              positions: jax.Array | None = None, *, window: int | None = None, sinks: int = 0,
              impl: str = "auto", block_q: int = 128, block_kv: int = 128) -> jax.Array:
  """Self-attention over whole rows with the implementation named `impl` (a key of `IMPLS`).

  q, k, v as in the module doc with q_seq = kv_seq; segment_ids, positions `[batch, seq]`
  (positions default to 0..seq-1, one document per row). Returns out `[batch, seq, heads,
  head_dim]`. block_q / block_kv: the tiles of the tiled implementations (`TILED`).
  """
  check_mask_args(window, sinks)
  tokens = row_tokens(segment_ids, positions)
  impl = resolve_impl(impl, q, k, v, block_q=block_q, block_kv=block_kv)
  tiles = dict(block_q=block_q, block_kv=block_kv) if impl in TILED else {}
  return IMPLS[impl](q, k, v, tokens, tokens, window=window, sinks=sinks, **tiles)[0]
