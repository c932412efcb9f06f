"""Learning rate x layer pattern x seed on the tiny Transformer and the demo data.

CPU-sized: 2 x 2 x 2 = 8 runs of 60 steps (~1.5 min each on one core; the whole grid in about
8 minutes on 2 cores with --parallel=2), each evaluated by its in-loop eval at the last step.
For a real comparison raise TrainConfig.steps (and the grid) on an accelerator.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.gin_files = ["configs/demo.gin", "configs/models/transformer_tiny.gin"]
  c.bindings = [
      "TrainConfig.steps = 60",
      "TrainConfig.log_every = 5",
      "TrainConfig.checkpoint_every = 30",
      "OptimConfig.warmup_steps = 10",
  ]
  c.axes = [
      ("ModelConfig.pattern", ["*-*-*-*-", "*-*-"]),
      ("OptimConfig.peak_learning_rate", [3e-3, 1e-2]),
      ("seed", [0, 1]),
  ]
  return c
