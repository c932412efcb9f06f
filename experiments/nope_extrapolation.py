"""Finding: a NoPE hybrid's language modelling extrapolates beyond its training length; a RoPE
Transformer's does not (the demo's hybrid vs the tiny Transformer, on Shakespeare).

    python experiments/sweep.py run experiments/nope_extrapolation.py \
        --root=runs/nope_extrapolation --parallel=2 --report=experiments/results/nope_extrapolation

Both train at 256 tokens per row on the plays only, then are scored by loss over held-out plays
at 1x-8x that length (`ppl_by_position`); two seeds each. The hybrid is hybrid_tiny's
"MM*-M*M-" (Mamba-2 carries order, attention has no positional encoding, as in NVIDIA's
Mamba-2-Hybrid); the Transformer is transformer_tiny (RoPE). Both tie their embeddings.
"""

import ml_collections

L = 256


def get_config():
  c = ml_collections.ConfigDict()
  # The Mamba-2 mixer's settings apply only to the hybrid.
  c.gin_files = ["configs/demo.gin", "configs/data/shakespeare.gin",
                 "configs/models/transformer_tiny.gin", "configs/mixers/mamba_tiny.gin"]
  c.bindings = [
      f"DataConfig.sequence_length = {L}",
      "TrainConfig.batch_size = 8",
      "TrainConfig.steps = 300",
      "TrainConfig.log_every = 25",
      "TrainConfig.checkpoint_every = 150",
      "TrainConfig.eval_every = 100000",
      "EvalConfig.suite = ('ppl_by_position',)",
      f"PplByPosition.lengths = ({L}, {2 * L}, {4 * L}, {8 * L})",
      "PplByPosition.documents = 4",
  ]
  c.eval = True
  c.axes = [
      ("model", {
          "hybrid_nope": ["ModelConfig.pattern = 'MM*-M*M-'",
                          "AttentionConfig.position_encoding = 'none'"],
          "transformer_rope": [],
      }),
      ("seed", [0, 1]),
  ]
  c.metric = "eval/lcjax_shakespeare/loss"
  c.figures = [("suite/ppl_by_position/length=*", "evaluation length")]
  c.claim = (
      "Expected: trained at 256 tokens, the NoPE hybrid's held-out loss stays flat at 512-2048 "
      "tokens (its Mamba-2 layers carry position, its attention has none to go out of range), "
      "while the RoPE Transformer's loss rises beyond 256 (positions it never saw). Scale: "
      "0.8-0.9M parameters, 300 steps of 8 x 256 tokens, 2 seeds.")
  return c
