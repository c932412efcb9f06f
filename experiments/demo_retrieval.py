"""Why a tiny hybrid does or does not learn passkey retrieval: measurements on a run's checkpoints.

    python experiments/demo_retrieval.py runs/demo [another workdir ...]

For every checkpoint of each run (its gin config read from DIR/config.gin), on the validation
passkey prompts:
  digit_cosine    mean pairwise cosine similarity of the ten digit embeddings (input side): near
                  1, the digits are one direction and no later block can tell them apart;
  identity_share  at the input of the first attention block (after its norm), over every digit
                  token, the share of the variance explained by which digit it is (between-
                  digit / total): what attention can read of the digit it would copy;
  digit_attention in each attention block, the attention mass that the positions predicting
                  an answer digit put on digit tokens (the needle's): about 10 / prompt length
                  when attention is blind to them, near 1 when it retrieves;
  exact_match     teacher-forced passkey exact match (every answer token right).
"""

import argparse
import itertools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def digit_ids(vocab) -> np.ndarray:
  return np.array([vocab.encode(str(d))[-1] for d in range(10)])


def digit_cosine(embedding: np.ndarray, ids: np.ndarray) -> float:
  e = embedding[ids] / np.linalg.norm(embedding[ids], axis=1, keepdims=True)
  pairs = list(itertools.combinations(range(len(ids)), 2))
  return float(np.mean([e[i] @ e[j] for i, j in pairs]))


def attention_inputs(model, batch) -> np.ndarray:
  """The normalised input of the first attention block `[batch, seq, embed]`."""
  from lcjax.models.attention import Attention

  x = model.embed(batch["inputs"])
  for block in model.blocks:
    if isinstance(block.mixer, Attention):
      return np.asarray(block.norm(x))
    x = block(x, segment_ids=batch["segment_ids"], positions=batch["positions"])
  raise ValueError("the model has no attention block")


def digit_attention(model, batch, ids: np.ndarray) -> list[float]:
  """Per attention block: mean attention mass (over heads and answer positions) on digits."""
  import jax
  import jax.numpy as jnp

  from lcjax.models.attention import Attention

  answer = (batch["loss_weights"] > 0) & np.isin(batch["targets"], ids)
  seg, pos = batch["segment_ids"], batch["positions"]
  visible = (seg[:, :, None] == seg[:, None, :]) & (np.arange(seg.shape[1])[:, None]
                                                     >= np.arange(seg.shape[1])[None, :])
  is_digit = np.isin(batch["inputs"], ids)
  x, masses = model.embed(batch["inputs"]), []
  for block in model.blocks:
    if isinstance(block.mixer, Attention):
      q, k, _ = block.mixer._qkv(block.norm(x), pos, x.shape[1])
      k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
      scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
      probs = jax.nn.softmax(jnp.where(visible[:, None], scores, -1e30), axis=-1)
      on_digits = np.asarray((probs * is_digit[:, None, None, :]).sum(-1))  # [b, h, q]
      masses.append(float(on_digits.transpose(0, 2, 1)[answer].mean()))
    x = block(x, segment_ids=seg, positions=pos)
  return masses


def identity_share(vectors: np.ndarray, labels: np.ndarray) -> float:
  mean = vectors.mean(0)
  total = ((vectors - mean) ** 2).sum()
  between = sum((labels == c).sum() * ((vectors[labels == c].mean(0) - mean) ** 2).sum()
                for c in np.unique(labels))
  return float(between / total)


def measure(workdir: str) -> list[dict]:
  import gin
  import jax
  from flax import nnx

  import lcjax.models.allocation  # noqa: F401  (configurables the saved config binds)
  import lcjax.train.distributed  # noqa: F401
  from lcjax.config import parse_gin
  from lcjax.data.pipeline import make_eval_batches, vocabulary
  from lcjax.eval.evaluate import evaluate
  from lcjax.run import Run, build
  from lcjax.train.checkpoint import Checkpointer

  gin.clear_config()
  parse_gin([os.path.join(os.path.abspath(workdir), "config.gin")], [])
  run = Run.from_gin()
  setup, vocab = build(run), vocabulary(run.data)
  ids = digit_ids(vocab)
  batches = make_eval_batches(run.data, "lcjax_passkey", 16, 4)
  ckpt = Checkpointer(workdir, every=1, keep=run.train.keep_checkpoints, create=False)
  rows = []
  for step in ckpt.all_steps():
    state, _ = ckpt.restore(step, setup.abstract_state(), gin.operative_config_str())
    params = jax.device_get(state["params"])
    model = nnx.merge(setup.graphdef, params)
    vectors, labels, attention = [], [], []
    for batch in batches:
      attention.append(digit_attention(model, batch, ids))
      h = attention_inputs(model, batch)
      is_digit = np.isin(batch["inputs"], ids) & (batch["segment_ids"] > 0)
      vectors.append(h[is_digit])
      labels.append(batch["inputs"][is_digit])
    em = evaluate(setup.eval_step, state["params"], {"lcjax_passkey": batches})
    rows.append({"run": workdir, "step": step,
                 "digit_cosine": digit_cosine(np.asarray(params["embed"]["embedding"]), ids),
                 "identity_share": identity_share(np.concatenate(vectors),
                                                  np.concatenate(labels)),
                 "digit_attention": np.mean(attention, axis=0).round(3).tolist(),
                 "exact_match": em["eval/lcjax_passkey/exact_match"]})
  ckpt.close()
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdirs", nargs="+")
  args = parser.parse_args()
  print("| run | step | digit_cosine | identity_share | digit_attention | exact_match |\n"
        "|---|---|---|---|---|---|")
  for workdir in args.workdirs:
    for r in measure(workdir):
      print(f"| {r['run']} | {r['step']} | {r['digit_cosine']:.3f} | "
            f"{r['identity_share']:.3f} | {r['digit_attention']} | {r['exact_match']:.2f} |")


if __name__ == "__main__":
  main()
