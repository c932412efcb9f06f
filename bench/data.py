"""Tokens/s of the input pipeline alone (no model): a text source and the same corpus
pre-tokenized, packed into rows of 8K and 32K tokens, with the byte and a SentencePiece
vocabulary.

The corpus is Shakespeare's training plays, one file per play, under --dir. For each case the
table gives the start-up time (building the iterator and its first batch: reading, tokenizing
and windowing this process's documents) and the tokens/s of the next --batches batches of 64K
tokens (documents' tokens, padding not counted), on however many cores the machine has.

    python bench/data.py [--batches=20] [--lengths=8192,32768] [--spm_vocab=8000]
        [--dir=/tmp/lcjax_data_bench]

--spm_vocab=0 skips SentencePiece (training it on the plays takes a minute on 2 cores).

A second table sets these rates beside what hybrid_125m's train steps would consume: its
training FLOPs per token (lcjax.train.flops, exact for the architecture) at an assumed 40% MFU
of a chip's bf16 peak, per host of chips; and so how many input processes, each as fast as the
slowest case measured here at that length, one host would need. That consumption is computed,
not measured.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

import lcjax.data as data  # noqa: E402
from lcjax.data import shakespeare, tokenized, train_spm  # noqa: E402
from lcjax.models.report import model_config  # noqa: E402
from lcjax.train import flops  # noqa: E402

TOKENS_PER_BATCH = 65536
MFU = 0.4
HOSTS = {"H100": 8, "TPU v5p": 4}  # chips per host


def write_corpus(root: str) -> str:
  os.makedirs(f"{root}/text", exist_ok=True)
  for name in shakespeare.split_names("train"):
    with open(f"{root}/text/{name}.txt", "w") as f:
      f.write(shakespeare.load_plays()[name])
  return f"{root}/text/*.txt"


def measure(cfg: data.DataConfig, batches: int) -> tuple[float, float]:
  """(seconds to the first batch, document tokens/s of the next `batches`)."""
  rows = max(1, TOKENS_PER_BATCH // cfg.sequence_length)
  start = time.perf_counter()
  it = data.make_train_iterator(cfg, batch_size=rows)
  next(it)
  startup = time.perf_counter() - start
  start, tokens = time.perf_counter(), 0
  for _ in range(batches):
    tokens += int(np.sum(next(it)["segment_ids"] > 0))
  return startup, tokens / (time.perf_counter() - start)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--lengths", default="8192,32768")
  p.add_argument("--spm_vocab", type=int, default=8000)
  p.add_argument("--dir", default="/tmp/lcjax_data_bench")
  args = p.parse_args()
  text = data.TextSource(name="plays", files=write_corpus(args.dir))
  vocabularies = ["byte"]
  if args.spm_vocab:
    vocabularies.append(train_spm.train(args.spm_vocab, f"{args.dir}/spm{args.spm_vocab}"))
  print(f"| vocabulary | source | row length | start-up s | tokens/s ({args.batches} batches of "
        f"{TOKENS_PER_BATCH}) |\n|---|---|---:|---:|---:|")
  slowest = {}
  for vocabulary in vocabularies:
    ids = f"{args.dir}/ids-{os.path.basename(vocabulary)}"
    tokenized.write(text, vocabulary, "train", ids, num_files=8)
    token = data.TokenSource(name="plays", files=f"{ids}/train-*.tokens.npy")
    for source in (text, token):
      for length in map(int, args.lengths.split(",")):
        cfg = data.DataConfig(sources=(source,), train_mixture="plays", vocabulary=vocabulary,
                              sequence_length=length)
        startup, rate = measure(cfg, args.batches)
        slowest[length] = min(slowest.get(length, rate), rate)
        print(f"| {os.path.basename(vocabulary)} | {type(source).__name__} | {length} | "
              f"{startup:.2f} | {rate:,.0f} |", flush=True)
  print_consumption(slowest)


def print_consumption(slowest: dict[int, float]) -> None:
  """hybrid_125m's tokens/s at MFU on each host of HOSTS, and the input processes it needs."""
  model = model_config(f"{REPO}/configs/models/hybrid_125m.gin")
  print(f"\n| chip | row length | train GFLOPs/token | tokens/s per chip at {MFU:.0%} MFU | "
        "chips per host | input processes per host |\n|---|---:|---:|---:|---:|---:|")
  for chip, chips in HOSTS.items():
    for length, rate in slowest.items():
      per_token = flops.train_flops_per_token(model, length)
      consumed = MFU * flops.PEAK_FLOPS[chip] / per_token
      print(f"| {chip} | {length} | {per_token / 1e9:.2f} | {consumed:,.0f} | {chips} | "
            f"{chips * consumed / rate:.2f} |")


if __name__ == "__main__":
  main()
