"""Bad configuration fails before anything compiles, with a message naming the cause and fix."""

import gin
import pytest

from lcjax.config import parse_gin
from lcjax.errors import ConfigError, ConfigTypeError
from lcjax.parallel.mesh import MeshConfig, make_mesh
from lcjax.run import Run, TrainConfig, build
from tests.train.runs import DEMO_GIN, TINY


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_misspelt_configurable_names_the_binding():
  with pytest.raises(ValueError, match="ModelConfg"):
    parse_gin([DEMO_GIN], ["ModelConfg.d_model = 64"])


def test_unknown_parameter_names_the_binding():
  with pytest.raises(ValueError, match="d_modle"):
    parse_gin([DEMO_GIN], ["ModelConfig.d_modle = 64"])


def test_wrong_type_names_the_binding():
  parse_gin([DEMO_GIN], ["TrainConfig.steps = 'many'"])
  with pytest.raises(TypeError, match=r"TrainConfig\.steps"):
    TrainConfig()


def test_impossible_mesh():
  with pytest.raises(ValueError, match="multiply to 3 devices but 8"):
    make_mesh(MeshConfig(data=3))
  with pytest.raises(ValueError, match="does not divide"):
    make_mesh(MeshConfig(data=-1, fsdp=3))
  with pytest.raises(ValueError, match="only one axis may be -1"):
    make_mesh(MeshConfig(data=-1, fsdp=-1))


def test_batch_that_does_not_divide_the_mesh():
  parse_gin([DEMO_GIN], TINY + ["TrainConfig.batch_size = 12"])
  with pytest.raises(ValueError, match="batch size 12 is not divisible by the 8 devices"):
    build(Run.from_gin())


def test_parameter_that_does_not_divide_its_mesh_axis():
  parse_gin([DEMO_GIN], TINY + ["MeshConfig.data = 1", "MeshConfig.tensor = 8"])
  with pytest.raises(ValueError, match="not divisible by mesh axes"):
    build(Run.from_gin())


def test_model_vocabulary_smaller_than_data_vocabulary():
  parse_gin([DEMO_GIN], TINY + ["ModelConfig.vocab_size = 128"])
  with pytest.raises(ValueError, match="vocab_size=128 is smaller"):
    build(Run.from_gin())


def test_wrong_type_in_a_data_task_config_names_the_binding():
  from lcjax.data.mqar import MqarConfig
  parse_gin([DEMO_GIN], ["MqarConfig.num_pairs = 8.5"])
  with pytest.raises(TypeError, match=r"MqarConfig\.num_pairs"):
    MqarConfig()


def test_sequence_length_the_layout_cannot_split():
  # 120 tokens split over 8 sequence shards is fine contiguously, but zigzag needs 2 x 8 chunks.
  parse_gin([DEMO_GIN], TINY + ["DataConfig.sequence_length = 120", "MeshConfig.data = 1",
                                "MeshConfig.sequence = 8", "SequenceConfig.layout = 'zigzag'"])
  with pytest.raises(ValueError, match="120 cannot be split in the 'zigzag' layout.*multiple of 16"):
    build(Run.from_gin())


def test_unknown_sequence_layout_names_the_binding():
  parse_gin([DEMO_GIN], TINY + ["SequenceConfig.layout = 'diagonal'"])
  with pytest.raises(ValueError, match="SequenceConfig.layout='diagonal'"):
    build(Run.from_gin())


@pytest.mark.parametrize("length", [0, -8])
def test_sequence_length_must_be_positive(length):
  from lcjax.data.pipeline import DataConfig
  with pytest.raises(ConfigError, match=f"DataConfig.sequence_length must be >= 1, got {length}"):
    DataConfig(sequence_length=length)


def test_configuration_errors_are_config_errors():
  """The CLIs report these as one paragraph with exit status 2 (lcjax.cli)."""
  with pytest.raises(ConfigError):
    make_mesh(MeshConfig(data=3))
  with pytest.raises(ConfigTypeError):
    TrainConfig(steps="many")
  with pytest.raises(ConfigError):
    parse_gin([DEMO_GIN], ["ModelConfg.d_model = 64"])
  gin.clear_config()
  parse_gin([DEMO_GIN], TINY + ["TrainConfig.batch_size = 12"])
  with pytest.raises(ConfigError):
    build(Run.from_gin())


@pytest.mark.parametrize("steps", [(0, 2), (3, 2), (5, 11)])
def test_profile_steps_outside_the_run(steps):
  with pytest.raises(ConfigError, match=r"profile_steps.*1 <= start <= stop <= .*10"):
    TrainConfig(steps=10, profile_steps=steps)
