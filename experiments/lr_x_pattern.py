"""Learning rate x layer pattern on the demo data: 3 x 3 = 9 short CPU runs."""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.gin_files = ["configs/demo.gin"]
  c.bindings = ["TrainConfig.steps = 300"]
  c.axes = [
      ("OptimConfig.peak_learning_rate", [1e-3, 3e-3, 1e-2]),
      ("ModelConfig.pattern", ["*-*-*-*-", "**--**--", "*-*-"]),
  ]
  return c
