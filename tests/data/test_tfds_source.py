"""TFDS sources (lcjax.data.tfds_source), offline, on a tiny dataset the test builds."""
import collections

import numpy as np
import pytest
import tensorflow_datasets as tfds

import lcjax.data as data
from lcjax.data import sources
from lcjax.errors import DataError
from tests.data.helpers import check_round_trip

LENGTH = 16
TRAIN = [f"train document {i} " * (1 + i % 3) for i in range(9)]
VALIDATION = ["held out one", "held out two"]


class LcjaxTinyText(tfds.core.GeneratorBasedBuilder):
  """Eleven short texts in two splits (registered with TFDS as 'lcjax_tiny_text')."""
  VERSION = tfds.core.Version("1.0.0")
  # No checksums file to find: TFDS would look for it beside this module with the
  # importlib_resources package, which lcjax does not install.
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text(), "id": tfds.features.Scalar(np.int32)}))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples(TRAIN),
            "validation": self._generate_examples(VALIDATION)}

  def _generate_examples(self, texts):
    for i, text in enumerate(texts):
      yield i, {"text": text, "id": i}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  LcjaxTinyText(data_dir=path).download_and_prepare()
  return path


def _texts(source, split="train", index=0, shards=1):
  tokens, _ = sources.source_windows(source, "byte", LENGTH, split, index, shards)
  byte = data.vocabulary(data.DataConfig())
  return collections.Counter(byte.decode(d.tolist()) for d in
                             np.split(tokens, np.nonzero(tokens == 1)[0] + 1) if len(d))


def test_splits_shares_and_resume(data_dir):
  source = data.TfdsSource(name="tiny", dataset="lcjax_tiny_text", data_dir=data_dir)
  assert _texts(source) == collections.Counter(TRAIN)
  assert _texts(source, "validation") == collections.Counter(VALIDATION)
  parts = [_texts(source, "train", i, 2) for i in range(2)]
  assert all(parts) and not parts[0] & parts[1] and parts[0] + parts[1] == _texts(source)
  cfg = data.DataConfig(sources=(source,), train_mixture="tiny", eval_tasks=("tiny",),
                        sequence_length=LENGTH, seed=2)
  check_round_trip(cfg, batch_size=2, skip=4, check=3)
  (batch,) = data.make_eval_batches(cfg, "tiny", batch_size=2, num_batches=1)
  assert batch["targets"].shape == (2, LENGTH)


def test_bad_names_and_fields(data_dir, tmp_path):
  missing = data.TfdsSource(name="x", dataset="lcjax_no_such_dataset")
  with pytest.raises(DataError, match="no TFDS dataset 'lcjax_no_such_dataset'"):
    _texts(missing)
  unprepared = data.TfdsSource(name="x", dataset="lcjax_tiny_text", data_dir=str(tmp_path))
  with pytest.raises(DataError, match="'lcjax_tiny_text' is not prepared in"):
    _texts(unprepared)
  field = data.TfdsSource(name="x", dataset="lcjax_tiny_text", data_dir=data_dir,
                          text_field="body")
  with pytest.raises(DataError, match="no feature 'body' \\(it has \\['id', 'text'\\]\\)"):
    _texts(field)
  no_validation = data.TfdsSource(name="x", dataset="lcjax_tiny_text", data_dir=data_dir,
                                  validation_split=None)
  with pytest.raises(DataError, match="has no validation_split"):
    _texts(no_validation, "validation")
