"""The data sources a config can name (`data.source`), one table: name -> how to load it.

Each entry reads a config's `data` block and returns a `Dataset`; `load` then applies the
block's train/test limits. A new source is one module and one line here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from linfjax import settings
from linfjax.data import cifar, folder, gtsrb, tfds_source
from linfjax.data.dataset import Dataset, DatasetError, limit
from linfjax.settings import choice, described, fail, integer, number, spec


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


CLEAN_SET_ORIGINS = ("held_out", "training")


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The `data` block."""
  source: str = spec("tfds", choice(*SOURCES), "Where the images come from (linfjax/data/).")
  name: str = spec("cifar10", described("a prepared TFDS dataset name; needed when "
                                        "source='tfds'"), "TFDS dataset name (source='tfds').")
  data_dir: str = spec("", None, "TFDS data_dir; '' means TFDS's default.")
  path: str = spec("", described("the source's folder (cifar10_dir, image_folder, gtsrb)"),
                   "The folder of a cifar-10-batches-py layout (cifar10_dir), of an image "
                   "folder dataset <path>/<split>/<class>/<images> (image_folder), or the "
                   "folder holding GTSRB/ as its official archives unpack (gtsrb).")
  train_split: str = spec("train", described("a non-empty split name"),
                          "TFDS split, or image folder split folder.")
  test_split: str = spec("test", described("a non-empty split name"), "Likewise for testing.")
  image_size: tuple = spec((), described("() or (height, width) in pixels, 1..4096"),
                           "(height, width) every image is resized to (tfds, image_folder, "
                           "gtsrb); () keeps the stored size, which must then be one size.")
  clean_set_size: int = spec(500, integer(1), "The defender's held-out clean set S (whole "
                             "tracks of GTSRB, at least this many images).")
  clean_set_from: str = spec("held_out", choice(*CLEAN_SET_ORIGINS),
                             '"held_out": S is kept out of training (ours, the default); '
                             '"training": S is clean copies of training images, which the model '
                             "has seen (BackdoorBench gives defenses 5 % of the training set).")
  clean_set_fraction: float = spec(0.0, number(0.0, 1.0, high_open=True),
                                   "S as a share of the training images; 0: clean_set_size "
                                   "images.")
  train_limit: int = spec(0, integer(0), "Use only the first N training images; 0 means all.")
  test_limit: int = spec(0, integer(0), "Likewise for the test split.")

  def check(self, prefix: str) -> None:
    source = SOURCES[self.source]
    if not getattr(self, source.field):
      fail(f"{prefix}.{source.field}", f"is empty; source={self.source!r} needs {source.needs}")
    for field in ("train_split", "test_split"):
      value = getattr(self, field)
      if not isinstance(value, str) or not value:
        fail(f"{prefix}.{field}", f"must be a non-empty split name, got {value!r}")
    size = tuple(self.image_size)
    if size and (len(size) != 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in size)):
      fail(f"{prefix}.image_size", f"must be () or (height, width) in pixels, 1..4096, got "
           f"{size!r}")
    if size and not source.resizes:
      resizing = ", ".join(name for name, other in SOURCES.items() if other.resizes)
      fail(f"{prefix}.image_size", f"applies to the {resizing} sources; {self.source} images "
           "are 32x32")


def clean_set_size(data_config, num_train: int) -> int:
  """How many images S holds: `clean_set_fraction` of the training images, else
  `clean_set_size`."""
  if data_config.clean_set_fraction:
    return max(1, int(round(data_config.clean_set_fraction * num_train)))
  return data_config.clean_set_size


def load(data_config) -> Dataset:
  """Loads the dataset a config's `data` block names, sliced by train/test limits."""
  if data_config.source not in SOURCES:
    raise DatasetError(f"unknown data source {data_config.source!r}; known: "
                       f"{', '.join(SOURCES)}")
  dataset = SOURCES[data_config.source].load(data_config)
  return limit(dataset, data_config.train_limit, data_config.test_limit)
