import gin
import pytest


@pytest.fixture
def gin_bindings():
  """Binds gin parameters for one test, then clears them."""
  def bind(**bindings):
    for name, value in bindings.items():
      gin.bind_parameter(name, value)

  yield bind
  gin.clear_config()
