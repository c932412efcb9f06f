"""Finding: recall needs attention (Waleffe et al. 2024, "An Empirical Study of Mamba-based
Language Models"; Jelassi et al. 2024, "Repeat After Me"; zoology's MQAR).

    python experiments/sweep.py run experiments/recall_needs_attention.py \
        --root=runs/recall_needs_attention --parallel=2 \
        --report=experiments/results/recall_needs_attention

Three models of one width and depth (d_model 64, 4 mixers each followed by a SwiGLU MLP):
pure Mamba-2, a hybrid with one attention mixer (first, no positional encoding, as NVIDIA's
hybrid) before three Mamba-2, and a RoPE Transformer; each trained on multi-query associative
recall (lcjax_mqar with one-letter keys and one-digit values, every key and value one byte token
as in zoology: "a:7 q:3 ... | q:3 a:7 ...") with every key queried, on three tasks that
change the pairs and the length one at a time: 4 pairs (33 tokens), 4 pairs with 32 random
capital letters between the pairs and the queries (65 tokens), 8 pairs (65 tokens). Each row
holds one example, so every cell sees 24 examples per step. Scored on the 256 held-out
examples by token accuracy of the queried values (chance 0.1; guessing among the values in the
context without reading the key does better: the report's analysis computes it). The report's
`parameters` column gives each model's size: a Mamba-2 mixer at this width has about twice
the parameters of an attention mixer, so the pure Mamba-2 model is the largest.
"""

import ml_collections


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
  rows = [f"| {name} | {m:.2f} | {s:.2f} |" for name, (pairs, _) in TASKS.items()
          for m, s in [key_blind_accuracy(pairs)]]
  return "\n".join([
      "### What a model scores without recall", "",
      "Expected token accuracy on the same held-out examples of predictors that ignore the "
      "queried key, breaking ties at random (the filler does not change the pairs, queries or "
      "answers):", "",
      "| task | the context's most frequent value | the most frequent value not yet answered |",
      "|---|---|---|", *rows])


def example_tokens(pairs: int, filler: int = 0) -> int:
  """An example's length in tokens (its EOS left out): every byte is one token."""
  from lcjax.data import mqar

  return mqar.example_bytes(mqar.MqarConfig(num_pairs=pairs, num_queries=pairs, key_letters=1,
                                            value_digits=1, filler=filler))


# (pairs, filler bytes): 4 pairs; the same 4 pairs filled out to 8 pairs' length; 8 pairs. The
# length and the pairs each change alone once.
FILLER = example_tokens(8) - example_tokens(4)
TASKS = {f"{p}pairs_{example_tokens(p, f)}tokens": (p, f)
         for p, f in ((4, 0), (4, FILLER), (8, 0))}


def _task(pairs: int, filler: int) -> list[str]:
  """One example per row (the row is the example and its EOS): every cell sees the same number
  of examples per step, whatever their length."""
  return [f"MqarConfig.num_pairs = {pairs}", f"MqarConfig.num_queries = {pairs}",
          f"MqarConfig.filler = {filler}",
          f"DataConfig.sequence_length = {example_tokens(pairs, filler) + 1}"]


# Each model: 4 mixers of one width, each followed by a SwiGLU MLP.
MODELS = {
    "mamba2": ["ModelConfig.pattern = 'M-M-M-M-'"],
    # Attention first: with a Mamba-2 block before the first attention, the tiny models stall
    # (README, "Why the demo's hybrid starts with attention").
    "hybrid": ["ModelConfig.pattern = '*-M-M-M-'", "AttentionConfig.position_encoding = 'none'"],
    "transformer": ["ModelConfig.pattern = '*-*-*-*-'"],
}

# What every recall grid shares (this one and recall_phonebook.py): the models' width and the
# settings the demo's retrieval work found to matter at this size (README, "Why the demo's
# hybrid starts with attention"): untied embeddings at init_std, every loss token weighing the
# same.
GIN_FILES = ["configs/demo.gin", "configs/models/transformer_tiny.gin",
             "configs/mixers/mamba_tiny.gin"]  # Mamba-2's settings apply where there is one
MODEL_BINDINGS = [
    "ModelConfig.d_model = 64",
    "AttentionConfig.num_heads = 2",
    "AttentionConfig.num_kv_heads = 2",
    "MLPConfig.hidden_dim = 192",
    "ModelConfig.tie_embeddings = False",
    "ModelConfig.embed_init_std = None",
    "DataConfig.loss_normalization = 'tokens'",
    "OptimConfig.peak_learning_rate = 3e-3",
    # Exact either way; on CPU, chunks of 16 run these short rows' SSD 2-5x faster than 64.
    "MambaConfig.chunk_size = 16",
    "TrainConfig.log_every = 100",
    "TrainConfig.checkpoint_every = 500",
    "TrainConfig.eval_every = 250",
]
STEPS = 1000
BATCH = 24


def get_config():
  from lcjax.data import mqar

  c = ml_collections.ConfigDict()
  c.gin_files = GIN_FILES
  c.bindings = MODEL_BINDINGS + [
      "DataConfig.train_mixture = 'lcjax_mqar'",
      "DataConfig.eval_tasks = ('lcjax_mqar',)",
      "MqarConfig.key_letters = 1",
      "MqarConfig.value_digits = 1",
      f"TrainConfig.batch_size = {BATCH}",
      # Every held-out example: one per row.
      f"TrainConfig.eval_batches = {-(-mqar.MqarConfig().num_validation // BATCH)}",
      f"TrainConfig.steps = {STEPS}",
  ]
  c.axes = [("model", MODELS), ("task", {name: _task(*task) for name, task in TASKS.items()})]
  c.metric = "eval/lcjax_mqar/token_accuracy"
  c.analysis = analysis
  c.claim = (
      "Expected (Waleffe et al. 2024; Jelassi et al. 2024; zoology): the pure Mamba-2 model's "
      "recall falls as the pairs grow (its fixed-size state must hold every pair) and as the "
      "example grows longer (it must carry them further, through more tokens); the "
      "Transformer's holds; a single attention mixer among Mamba-2 ones closes most of the "
      f"gap. Scale: 0.2-0.3M parameters, {STEPS} steps of {BATCH} examples per cell (held-out "
      "accuracy logged every 250); one seed.")
  return c
