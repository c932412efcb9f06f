"""Every gin-configured dataclass of the run rejects a wrong-typed binding at start-up."""

import gin
import pytest

from lcjax.config import parse_gin
from lcjax.train.distributed import DistributedConfig
from lcjax.train.optim import OptimConfig


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.parametrize("binding, config, name", [
    ("OptimConfig.peak_learning_rate = 'high'", OptimConfig, r"OptimConfig\.peak_learning_rate"),
    ("OptimConfig.warmup_steps = 1.5", OptimConfig, r"OptimConfig\.warmup_steps"),
    ("DistributedConfig.enabled = 'yes'", DistributedConfig, r"DistributedConfig\.enabled"),
    ("DistributedConfig.num_processes = 2.0", DistributedConfig,
     r"DistributedConfig\.num_processes"),
])
def test_wrong_type_names_the_binding(binding, config, name):
  parse_gin([], [binding])
  with pytest.raises(TypeError, match=name):
    config()


def test_right_types_pass():
  parse_gin([], ["OptimConfig.peak_learning_rate = 1",  # an int is a fine float
                 "DistributedConfig.local_device_ids = (0, 1)"])
  assert OptimConfig().peak_learning_rate == 1
  assert DistributedConfig().local_device_ids == (0, 1)
