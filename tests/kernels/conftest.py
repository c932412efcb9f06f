import numpy as np
import pytest


@pytest.fixture
def rng():
  """A freshly seeded generator; the seed is printed, and pytest shows it if the test fails."""
  seed = np.random.SeedSequence().entropy
  print(f"numpy seed: {seed}")
  return np.random.default_rng(seed)
