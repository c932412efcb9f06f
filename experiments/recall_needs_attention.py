"""Finding: recall needs attention (Waleffe et al. 2024, "An Empirical Study of Mamba-based
Language Models"; Jelassi et al. 2024, "Repeat After Me"; zoology's MQAR).

    python experiments/sweep.py run experiments/recall_needs_attention.py \
        --root=runs/recall_needs_attention --parallel=2 \
        --report=experiments/results/recall_needs_attention

Three models of one width and depth (d_model 128, 4 mixers each followed by a SwiGLU MLP):
pure Mamba-2, a hybrid with one attention mixer among three Mamba-2 (no positional encoding,
as NVIDIA's hybrid), and a RoPE Transformer; each trained on multi-query associative recall
(lcjax_mqar: "abc:17 qrs:03 ... | qrs:03 ...") with 4, 8 or 16 key-value pairs, and scored on
held-out examples by token accuracy of the queried values (chance 0.1 a digit). The report's
`parameters` column gives each model's size: a Mamba-2 mixer at this width has about twice the
parameters of an attention mixer, so the pure Mamba-2 model is the largest.
"""

import ml_collections

def _pairs(pairs: int, queries: int) -> list[str]:
  return [f"MqarConfig.num_pairs = {pairs}", f"MqarConfig.num_queries = {queries}"]


def get_config():
  c = ml_collections.ConfigDict()
  # The Mamba-2 mixer's settings apply only to the variants that have one.
  c.gin_files = ["configs/demo.gin", "configs/models/transformer_tiny.gin",
                 "configs/mixers/mamba_tiny.gin"]
  c.bindings = [
      "DataConfig.train_mixture = 'lcjax_mqar'",
      "DataConfig.eval_tasks = ('lcjax_mqar',)",
      "DataConfig.sequence_length = 256",
      "TrainConfig.batch_size = 8",
      "TrainConfig.steps = 300",
      "TrainConfig.log_every = 25",
      "TrainConfig.checkpoint_every = 150",
      "TrainConfig.eval_every = 100000",
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
      ("pairs", {"4": _pairs(4, 4), "8": _pairs(8, 8), "16": _pairs(16, 8)}),
  ]
  c.metric = "eval/lcjax_mqar/token_accuracy"
  c.claim = (
      "Expected (Waleffe et al. 2024; Jelassi et al. 2024; zoology): as the number of key-value "
      "pairs grows, the pure Mamba-2 model's recall falls, since its fixed-size state must hold "
      "every pair; the Transformer's holds; a single attention mixer among Mamba-2 ones closes "
      "most of the gap. Scale: 0.8-1.0M parameters, 300 steps of 8 x 256 tokens per cell.")
  return c
