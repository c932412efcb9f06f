"""Finding: recall needs attention (Waleffe et al. 2024, "An Empirical Study of Mamba-based
Language Models"; Jelassi et al. 2024, "Repeat After Me"; zoology's MQAR).

    python experiments/sweep.py run experiments/recall_needs_attention.py \
        --root=runs/recall_needs_attention --parallel=2 \
        --report=experiments/results/recall_needs_attention

Three models of one width and depth (d_model 64, 4 mixers each followed by a SwiGLU MLP):
pure Mamba-2, a hybrid with one attention mixer among three Mamba-2 (no positional encoding,
as NVIDIA's hybrid), and a RoPE Transformer; each trained on multi-query associative recall
(lcjax_mqar with one-letter keys and one-digit values, every key and value one byte token as in
zoology: "a:7 q:3 ... | q:3 a:7 ...") with 4, 8 or 12 key-value pairs, every key queried, and
scored on the 256 held-out examples by token accuracy of the queried values (chance 0.1;
guessing among the values in the context without reading the key does better: the
report's analysis computes it). The report's
`parameters` column gives each model's size: a Mamba-2 mixer at this width has about twice
the parameters of an attention mixer, so the pure Mamba-2 model is the largest.
"""

import ml_collections

PAIRS = (4, 8, 12)


def key_blind_accuracy(pairs: int) -> tuple[float, float]:
  """Token accuracy on the validation examples of two predictors that never look at the
  queried key: the most frequent value of the context, and the most frequent of the values not
  yet answered (every key is queried once, so answered values can be struck off)."""
  from collections import Counter

  from lcjax.data import mqar

  cfg = mqar.MqarConfig(num_pairs=pairs, num_queries=pairs, key_letters=1, value_digits=1)
  segments, _ = mqar.generate(cfg, "validation")
  mode = struck = total = 0
  for row in segments:
    answers = list(row[1::2])  # the queried values, in query order
    context = Counter(answers)  # every key is queried: the context's values, counted
    left = Counter(context)
    for answer in answers:
      mode += _chance_of(answer, context)
      struck += _chance_of(answer, left)
      left[answer] -= 1
      total += 1
  return mode / total, struck / total


def _chance_of(answer, counts) -> float:
  """The chance that guessing uniformly among the most frequent values of `counts` hits."""
  top = max(counts.values())
  tied = [v for v, n in counts.items() if n == top]
  return (answer in tied) / len(tied)


def analysis(out) -> str:
  """The key-blind baselines, as markdown (what a model scores without recall)."""
  del out
  rows = [f"| {p} | {m:.2f} | {s:.2f} |" for p in PAIRS for m, s in [key_blind_accuracy(p)]]
  return "\n".join([
      "### What a model scores without recall", "",
      "Expected token accuracy on the same held-out examples of predictors that ignore the "
      "queried key, breaking ties at random:", "",
      "| pairs | the context's most frequent value | the most frequent value not yet answered |",
      "|---|---|---|", *rows])


def _pairs(pairs: int) -> list[str]:
  return [f"MqarConfig.num_pairs = {pairs}", f"MqarConfig.num_queries = {pairs}"]


def get_config():
  c = ml_collections.ConfigDict()
  # The Mamba-2 mixer's settings apply only to the variants that have one.
  c.gin_files = ["configs/demo.gin", "configs/models/transformer_tiny.gin",
                 "configs/mixers/mamba_tiny.gin"]
  c.bindings = [
      "ModelConfig.d_model = 64",
      "AttentionConfig.num_heads = 2",
      "AttentionConfig.num_kv_heads = 2",
      "MLPConfig.hidden_dim = 192",
      "DataConfig.train_mixture = 'lcjax_mqar'",
      "DataConfig.eval_tasks = ('lcjax_mqar',)",
      "MqarConfig.key_letters = 1",
      "MqarConfig.value_digits = 1",
      "DataConfig.sequence_length = 128",
      "TrainConfig.batch_size = 32",
      "TrainConfig.steps = 400",
      "TrainConfig.log_every = 50",
      "TrainConfig.checkpoint_every = 200",
      "TrainConfig.eval_every = 100",
      "TrainConfig.eval_batches = 8",
      "OptimConfig.peak_learning_rate = 3e-3",
  ]
  c.axes = [
      ("model", {
          "mamba2": ["ModelConfig.pattern = 'M-M-M-M-'"],
          "hybrid": ["ModelConfig.pattern = 'M-M-*-M-'",
                     "AttentionConfig.position_encoding = 'none'"],
          "transformer": [],
      }),
      ("pairs", {str(p): _pairs(p) for p in PAIRS}),
  ]
  c.metric = "eval/lcjax_mqar/token_accuracy"
  c.analysis = analysis
  c.claim = (
      "Expected (Waleffe et al. 2024; Jelassi et al. 2024; zoology): as the number of key-value "
      "pairs grows, the pure Mamba-2 model's recall falls, since its fixed-size state must hold "
      "every pair; the Transformer's holds; a single attention mixer among Mamba-2 ones closes "
      "most of the gap. Scale: 0.2-0.4M parameters, 400 steps of 32 x 128 tokens per cell "
      "(held-out accuracy logged every 100).")
  return c
