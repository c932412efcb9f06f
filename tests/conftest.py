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
  """A freshly seeded generator; the seed is printed (pytest shows it if the test fails) and
  LCJAX_SEED=<seed> replays it."""
  seed = int(os.environ.get("LCJAX_SEED") or np.random.SeedSequence().entropy)
  print(f"numpy seed: {seed} (replay: LCJAX_SEED={seed})")
  return np.random.default_rng(seed)
