"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


import numpy as np  # noqa: E402  (after the environment is set)
import pytest  # noqa: E402


@pytest.fixture
def rng():
  """A freshly seeded generator; the seed is printed, and pytest shows it if the test fails."""
  seed = np.random.SeedSequence().entropy
  print(f"numpy seed: {seed}")
  return np.random.default_rng(seed)
