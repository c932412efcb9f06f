"""Memory of the LM head's loss and gradients, plain vs chunked, by vocabulary and row length.

For each (vocab, tokens): the loss of one row's hidden states `[1, tokens, d_model]` through
the head `[d_model, vocab]` (weighted sum of per-token cross-entropies, as the train step
takes it) and its gradients w.r.t. hidden and head, jitted and compiled for abstract inputs:
nothing runs, so every size compiles on a CPU. Columns: the bytes of the whole float32 logits,
XLA's temporary memory (`memory_analysis`, deterministic on CPU) of the plain loss
(`lcjax.kernels.losses.cross_entropy`) and of the chunked one at the chunk length
`ModelConfig.loss_chunk = "auto"` picks (`lcjax.models.loss.chunk_length`). The rest of the
model is left out: its memory does not depend on the loss. Prints a markdown table (recorded in
bench/README.md).

    python bench/loss_memory.py [--d_model=1024] [--dtype=bfloat16]
        [--vocabs=32768,131072,262144] [--tokens=8192,16384,32768,65536]
"""

import argparse
import functools
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lcjax.kernels.losses import chunked_cross_entropy, cross_entropy  # noqa: E402
from lcjax.models.loss import chunk_length  # noqa: E402

MIB = 2**20


def temp_mib(loss_fn, tokens: int, d_model: int, vocab: int, dtype) -> float:
  """XLA temporaries of value_and_grad(weighted loss) w.r.t. (hidden, head), compiled only."""
  def loss(hidden, head, targets, weights):
    return jnp.sum(loss_fn(hidden, head, targets)[0] * weights)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  rows = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
  compiled = step.lower(jax.ShapeDtypeStruct((1, tokens, d_model), dtype),
                        jax.ShapeDtypeStruct((d_model, vocab), jnp.float32), rows,
                        jax.ShapeDtypeStruct((1, tokens), jnp.float32)).compile()
  return compiled.memory_analysis().temp_size_in_bytes / MIB


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--d_model", type=int, default=1024)
  p.add_argument("--dtype", default="bfloat16", help="the hidden states' (compute) dtype")
  p.add_argument("--vocabs", default="32768,131072,262144")
  p.add_argument("--tokens", default="8192,16384,32768,65536", help="row lengths (batch 1)")
  args = p.parse_args()
  dtype = jnp.dtype(args.dtype)
  print(f"d_model={args.d_model} hidden {dtype.name}, head float32, batch 1; device: "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}; jax {jax.__version__}\n")
  print("| vocab | tokens | float32 logits MiB | plain temp MiB | auto chunk | chunked temp MiB "
        "| plain / chunked |")
  print("|---:|---:|---:|---:|---:|---:|---:|")
  start = time.perf_counter()
  for vocab in (int(v) for v in args.vocabs.split(",")):
    for tokens in (int(t) for t in args.tokens.split(",")):
      chunk = chunk_length("auto", 1, tokens, vocab)
      plain = temp_mib(cross_entropy, tokens, args.d_model, vocab, dtype)
      chunked = temp_mib(functools.partial(chunked_cross_entropy, chunk=chunk), tokens,
                         args.d_model, vocab, dtype)
      print(f"| {vocab} | {tokens} | {tokens * vocab * 4 / MIB:.0f} | {plain:.0f} | {chunk} "
            f"| {chunked:.0f} | {plain / chunked:.1f}x |", flush=True)
  print(f"\n{time.perf_counter() - start:.0f} s of compiling")


if __name__ == "__main__":
  main()
