"""What every generated task (passkey, MQAR, copy, phonebook) draws a split with."""
import numpy as np


def split_draws(cfg, split: str) -> tuple[int, np.random.Generator]:
  """A split's example count and its generator, from the task config's num_train / train_seed
  or num_validation / validation_seed: the same split always draws the same examples."""
  n, seed = ((cfg.num_train, cfg.train_seed) if split == "train"
             else (cfg.num_validation, cfg.validation_seed))
  return n, np.random.default_rng(seed)
