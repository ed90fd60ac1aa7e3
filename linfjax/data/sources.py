"""The data sources a config can name (`data.source`), one table: name -> how to load it.

Each entry reads a config's `data` block and returns a `Dataset`; `load` then applies the
block's train/test limits. A new source is one module and one line here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from linfjax.data import cifar, folder, gtsrb, tfds_source
from linfjax.data.dataset import Dataset, DatasetError, limit


@dataclasses.dataclass(frozen=True)
class Source:
  """How a `data.source` name loads, and what its `data.path` or `data.name` must name."""
  load: Callable[..., Dataset]  # (config.data) -> Dataset
  needs: str  # What the source needs, for the message when data.path / data.name is empty.
  field: str = "path"  # The data field that must not be empty.
  resizes: bool = True  # Whether data.image_size applies.


def _path(data_config) -> str:
  return os.path.expanduser(data_config.path)


SOURCES: dict[str, Source] = {
    "cifar10_dir": Source(lambda c: cifar.load_cifar10_dir(_path(c)),
                          "the directory of a cifar-10-batches-py layout", resizes=False),
    "tfds": Source(lambda c: tfds_source.load_tfds(
        c.name, c.data_dir, train_split=c.train_split, test_split=c.test_split,
        image_size=tuple(c.image_size)), "a TFDS dataset name such as 'cifar10'", field="name"),
    "image_folder": Source(lambda c: folder.load_image_folder(
        _path(c), train_split=c.train_split, test_split=c.test_split,
        image_size=tuple(c.image_size)),
        "a folder holding the train and test split folders, each with one folder of images "
        "per class"),
    "gtsrb": Source(lambda c: gtsrb.load_gtsrb(_path(c), image_size=tuple(c.image_size)),
                    "the folder holding GTSRB/ as its official archives unpack (python -m "
                    "linfjax.fetch gtsrb DIR)"),
}


def load(data_config) -> Dataset:
  """Loads the dataset a config's `data` block names, sliced by train/test limits."""
  if data_config.source not in SOURCES:
    raise DatasetError(f"unknown data source {data_config.source!r}; known: "
                       f"{', '.join(SOURCES)}")
  dataset = SOURCES[data_config.source].load(data_config)
  return limit(dataset, data_config.train_limit, data_config.test_limit)
