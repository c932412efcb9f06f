"""Learning rate x layer pattern x seed on the tiny Transformer and the demo data.

CPU-sized: 2 x 2 x 2 = 8 runs of 40 steps, each then evaluated by `lcjax.eval` (loss by
position on 2 held-out documents): 14.8 CPU-minutes in all, under 12 minutes on 2 cores with
--parallel=2 (experiments/results/lr_x_pattern/ is its report).
For a real comparison raise TrainConfig.steps (and the grid) on an accelerator.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.gin_files = ["configs/demo.gin", "configs/models/transformer_tiny.gin"]
  c.bindings = [
      "TrainConfig.steps = 40",
      "TrainConfig.log_every = 5",
      "TrainConfig.checkpoint_every = 20",
      "OptimConfig.warmup_steps = 10",
      "PplByPosition.documents = 2",
  ]
  c.eval = ["ppl_by_position"]
  c.axes = [
      ("ModelConfig.pattern", ["*-*-*-*-", "*-*-"]),
      ("OptimConfig.peak_learning_rate", [3e-3, 1e-2]),
      ("seed", [0, 1]),
  ]
  return c
