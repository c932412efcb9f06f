"""Peak host memory of `python -m lcjax.convert import` on a ~1B-parameter Llama checkpoint.

Generates a random `LlamaForCausalLM` checkpoint (bfloat16 safetensors, sharded as
transformers shards, written one shard at a time so this script stays small), imports it in a
subprocess, and prints a markdown table (recorded in bench/README.md): parameters, checkpoint
bytes, import wall time, the import process's peak RSS (`os.wait4`'s ru_maxrss), the peak RSS
of an interpreter that only loads what the import command loads (`BASELINE`), and the peak
RSS, with and without the baseline, over the float32 model bytes. On CPU the "device" arrays
live in host memory, so the float32 params themselves count there; on an accelerator they
would not.

    python bench/import_memory.py [--dir=/tmp/lcjax_import_bench] [--layers=20] [--keep]

Needs about 2 GB (checkpoint) + 4 GB (the float32 orbax checkpoint) of disk under --dir;
deletes both unless --keep.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from lcjax.convert.safetensors_io import write_checkpoint  # noqa: E402

GB = 10**9
# What the import command loads before reading a tensor: JAX, the run's configurables (seqio and
# TensorFlow with them) and the data vocabulary it compares the model's with.
BASELINE = ("import jax, lcjax.convert.__main__, lcjax.models.allocation, lcjax.run; "
            "from lcjax.data.vocab import from_name; from_name('byte').vocab_size; "
            "jax.numpy.zeros(1)")


def llama_config(layers: int) -> dict:
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
          "intermediate_size": 5632, "num_hidden_layers": layers, "num_attention_heads": 16,
          "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 32000,
          "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
          "rope_theta": 10000.0, "tie_word_embeddings": False, "dtype": "bfloat16"}


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
  d, f, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
  q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
  shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,),
            "lm_head.weight": (c["vocab_size"], d)}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes.update({
        p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
        p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
        p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
        p + "mlp.down_proj.weight": (d, f)})
  return shapes


def generate(path: str, config: dict) -> int:
  """Writes the random checkpoint; returns its parameter count."""
  rng = np.random.default_rng(0)
  shapes = tensor_shapes(config)
  tensors = ((name, (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16))
             for name, shape in shapes.items())
  write_checkpoint(path, tensors, {"config.json": json.dumps(config)}, max_shard_size="1GB")
  return sum(int(np.prod(s)) for s in shapes.values())


def peak_rss(args: list[str]) -> tuple[float, float]:
  """(wall seconds, peak RSS in bytes) of `python ARGS`, which must succeed."""
  start = time.time()
  proc = subprocess.Popen([sys.executable, *args], cwd=REPO)
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    raise SystemExit(f"{args} failed with status {proc.returncode}")
  return time.time() - start, usage.ru_maxrss * 1024  # Linux: KiB


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--dir", default="/tmp/lcjax_import_bench")
  p.add_argument("--layers", type=int, default=20)
  p.add_argument("--keep", action="store_true")
  a = p.parse_args()
  if os.path.exists(a.dir):
    raise SystemExit(f"{a.dir} exists: remove it or give another --dir.")
  hf, work = os.path.join(a.dir, "hf"), os.path.join(a.dir, "work")
  try:
    t = time.time()
    n = generate(hf, llama_config(a.layers))
    print(f"generated {n / 1e9:.3f}B parameters in {time.time() - t:.0f} s", flush=True)
    ckpt = sum(os.path.getsize(os.path.join(hf, f)) for f in os.listdir(hf))
    _, base = peak_rss(["-c", BASELINE])
    wall, rss = peak_rss(["-m", "lcjax.convert", "import", f"--hf={hf}", f"--workdir={work}"])
  finally:
    if not a.keep:
      shutil.rmtree(a.dir, ignore_errors=True)
  print("\n| parameters | checkpoint (bf16) | float32 params | import wall s | peak RSS | "
        "baseline RSS | peak RSS / float32 params | (peak - baseline) / float32 params |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|")
  print(f"| {n / 1e9:.3f}B | {ckpt / GB:.2f} GB | {4 * n / GB:.2f} GB | {wall:.0f} | "
        f"{rss / GB:.2f} GB | {base / GB:.2f} GB | {rss / (4 * n):.2f} | "
        f"{(rss - base) / (4 * n):.2f} |")


if __name__ == "__main__":
  main()
