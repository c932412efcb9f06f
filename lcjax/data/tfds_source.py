"""TFDS datasets as sources: a prepared dataset by name and split, read from its data_dir
(offline: nothing is downloaded here), windowed and shared out as every source (sources.py).

Each process reads only its even share of a split (tfds.even_splits), so the shares are
disjoint, cover the split, and need no other process's documents.
"""
import dataclasses

import gin
import tensorflow_datasets as tfds

from lcjax.data import readers, sources
from lcjax.errors import ConfigError, DataError


@gin.configurable
@dataclasses.dataclass(frozen=True, kw_only=True)
class TfdsSource(sources.Source):
  """dataset: a TFDS name, optionally with config and version ('pg19', 'wiki40b/en:1.3.0');
  data_dir: where it was prepared (None: TFDS's default); text_field: the text feature;
  train_split / validation_split: TFDS split strings (e.g. 'train[:90%]'; None: no such
  split)."""
  dataset: str
  data_dir: str | None = None
  text_field: str = "text"
  train_split: str = "train"
  validation_split: str | None = "validation"

  def __post_init__(self):
    super().__post_init__()
    if not self.dataset:
      raise ConfigError(f"{self.describe()}.dataset is empty: name a TFDS dataset.")

  def _split(self, split: str) -> str:
    tfds_split = {"train": self.train_split, "validation": self.validation_split}[split]
    if not tfds_split:
      raise DataError(f"{self.describe()} has no {split}_split. Fix: set TfdsSource."
                      f"{split}_split, or leave {self.name!r} out of DataConfig.eval_tasks.")
    return tfds_split

  def _builder(self):
    try:
      builder = tfds.builder(self.dataset, data_dir=self.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise DataError(f"{self.describe()}: no TFDS dataset {self.dataset!r}. Fix the name "
                      "(`tfds.list_builders()` lists them), or import the module that "
                      "defines it.") from None
    if not builder.is_prepared():
      raise DataError(f"{self.describe()}: {self.dataset!r} is not prepared in "
                      f"{builder.data_dir}. Fix: prepare it there (`tfds build "
                      f"{self.dataset} --data_dir=DIR`) and set TfdsSource.data_dir.")
    return builder

  def shards(self, split):
    return [self._split(split)]

  def texts(self, split, shard_index, num_shards):
    builder = self._builder()
    share = tfds.even_splits(self._split(split), n=num_shards, drop_remainder=False)[shard_index]
    if self.text_field not in builder.info.features:
      raise DataError(f"{self.describe()}: {self.dataset!r} has no feature "
                      f"{self.text_field!r} (it has {sorted(builder.info.features)}). Fix: "
                      "set TfdsSource.text_field.")
    skipped = readers.Skipped()
    for number, example in enumerate(tfds.as_numpy(builder.as_dataset(split=share,
                                                                      shuffle_files=False))):
      text = readers.decode(example[self.text_field], f"{self.dataset} {share} example "
                            f"{number}", 0, "raise", skipped)
      yield text
