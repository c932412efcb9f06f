"""The copy task on transformers' LlamaForCausalLM (PyTorch): an independent baseline for how
fast a tiny Transformer learns to copy (README, "Why the demo's hybrid starts with attention").

  python experiments/copy_with_transformers.py [--max_chars 16] [--steps 1000]

The strings are lcjax_copy's (`lcjax.data.copying`), one per row, BOS first and EOS last, loss
on the copy and the EOS; the model and optimizer match the README's lcjax runs (d_model 64, two
layers, 4 query / 2 KV heads of 32, untied embeddings at std 0.02, AdamW lr 5e-3 betas
(0.9, 0.95), weight decay 0.1, clipping at 1, 50 warmup steps, cosine to 10%), with 64 strings
a step. Needs requirements-test.txt (torch, transformers); the library never imports them.
"""
import argparse
import math

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lcjax.data import copying

BOS, EOS, OFFSET, VOCAB = 0, 1, 3, 384  # lcjax's byte vocabulary: id = byte + 3


def encode(cfg: copying.CopyConfig, split: str):
  """(ids [n, L] int64, weights [n, L] float32: 1 where ids[:, t + 1] is a loss target)."""
  segments, _ = copying.generate(cfg, split)
  rows = []
  for prompt, answer in segments:
    ids = [BOS] + [b + OFFSET for b in (prompt + answer).encode()] + [EOS]
    rows.append((ids, [0] * (1 + len(prompt)) + [1] * (len(answer) + 1)))
  width = max(len(ids) for ids, _ in rows)
  ids = np.zeros((len(rows), width), np.int64)
  weights = np.zeros((len(rows), width), np.float32)
  for i, (row, w) in enumerate(rows):
    ids[i, :len(row)], weights[i, :len(w)] = row, w
  return torch.tensor(ids), torch.tensor(weights)


def loss_and_accuracy(model, ids, weights):
  logits = model(ids).logits[:, :-1]
  targets, w = ids[:, 1:], weights[:, :-1]
  ce = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1),
                                         reduction="none").view_as(w)
  right = (logits.argmax(-1) == targets).float()
  return (ce * w).sum() / w.sum(), (right * w).sum() / w.sum()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--max_chars", type=int, default=16)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=64)
  args = parser.parse_args()
  torch.manual_seed(0)
  cfg = copying.CopyConfig(max_chars=args.max_chars)
  train_ids, train_w = encode(cfg, "train")
  valid_ids, valid_w = encode(cfg, "validation")
  model = LlamaForCausalLM(LlamaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
      tie_word_embeddings=False))
  optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, betas=(0.9, 0.95), weight_decay=0.1)
  warmup_cosine = lambda s: min(1.0, (s + 1) / 50) * (
      0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
  schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
  rows = torch.Generator().manual_seed(0)
  print("| step | train loss | validation loss | validation token accuracy |\n|---|---|---|---|")
  for step in range(1, args.steps + 1):
    batch = torch.randint(0, len(train_ids), (args.batch,), generator=rows)
    loss, _ = loss_and_accuracy(model, train_ids[batch], train_w[batch])
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    if step % 250 == 0:
      with torch.no_grad():
        valid_loss, accuracy = loss_and_accuracy(model, valid_ids, valid_w)
      print(f"| {step} | {loss.item():.3f} | {valid_loss.item():.3f} | {accuracy.item():.3f} |",
            flush=True)


if __name__ == "__main__":
  main()
