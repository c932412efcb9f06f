"""Data layer: vocabularies, seqio tasks (each declaring whether it has answers), corpora of
one's own from gin (sources.py), packing and checkpointable batch iterators. Imports no lcjax
package but lcjax.config.

This is the only package that imports tensorflow / seqio. Importing it keeps
TensorFlow off the GPUs (JAX owns them) and quiet.
"""
import logging
import os

# Must be set before tensorflow is first imported to silence its C++ logging.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")
tf.get_logger().setLevel("ERROR")


class _QuietLibraries(logging.Filter):
  """Drops sub-ERROR absl records that seqio/TF emit (a warning per task build),
  without lowering the verbosity of everyone else's absl logging."""

  _DIRS = tuple(os.path.dirname(m.__file__) for m in (seqio, tf))

  def filter(self, record):
    return record.levelno >= logging.ERROR or not record.pathname.startswith(self._DIRS)


logging.getLogger("absl").addFilter(_QuietLibraries())

from lcjax.data.pipeline import (  # noqa: E402
    BatchIterator,
    DataConfig,
    make_eval_batches,
    make_train_iterator,
    vocabulary,
)
from lcjax.data.mixtures import TokenShareMixture  # noqa: E402
from lcjax.data.sources import JsonlSource, TextSource  # noqa: E402
from lcjax.data.tasks import register_tasks  # noqa: E402
from lcjax.data.tfds_source import TfdsSource  # noqa: E402
from lcjax.data.tokenized import TokenSource  # noqa: E402

__all__ = [
    "BatchIterator",
    "DataConfig",
    "JsonlSource",
    "TextSource",
    "TfdsSource",
    "TokenShareMixture",
    "TokenSource",
    "make_eval_batches",
    "make_train_iterator",
    "register_tasks",
    "vocabulary",
]
