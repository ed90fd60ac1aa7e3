"""A folder of one sub-folder of images per class, for the train and the test split."""

from __future__ import annotations

import os

import numpy as np
from absl import logging

from linfjax.data import images as image_files
from linfjax.data.dataset import Dataset, DatasetError, stack_images


def _class_folders(split_dir: str) -> list[str]:
  if not os.path.isdir(split_dir):
    raise DatasetError(f"{split_dir}: no such directory (an image folder dataset needs "
                       "<path>/<split>/<class>/<image files>)")
  return sorted(name for name in os.listdir(split_dir)
                if not name.startswith(".") and os.path.isdir(os.path.join(split_dir, name)))


def _read_split(split_dir: str, class_names: tuple[str, ...], image_size):
  """Every image of a split as (uint8 [N, H, W, 3], int32 [N]) in class, then file order."""
  arrays, labels, paths, skipped = [], [], [], 0
  folders = _class_folders(split_dir)
  if not folders:
    raise DatasetError(f"{split_dir}: no class folders")
  for name in folders:
    if name not in class_names:
      raise DatasetError(f"{os.path.join(split_dir, name)}: class folder {name!r} is not one of "
                         f"the training split's classes ({', '.join(class_names)})")
    folder = os.path.join(split_dir, name)
    files = sorted(os.listdir(folder))
    chosen = [f for f in files if image_files.is_image_name(f)]
    skipped += len(files) - len(chosen)
    if not chosen:
      raise DatasetError(f"{folder}: no image files (known extensions: "
                         f"{', '.join(image_files.EXTENSIONS)})")
    for file_name in chosen:
      path = os.path.join(folder, file_name)
      try:
        arrays.append(image_files.decode(path, size=tuple(image_size) or None))
      except image_files.ImageError as e:
        raise DatasetError(str(e)) from None
      labels.append(class_names.index(name))
      paths.append(path)
  if skipped:
    logging.info("%s: skipped %d files that are not images", split_dir, skipped)
  return stack_images(arrays, lambda i: paths[i]), np.asarray(labels, np.int32)


def load_image_folder(path: str, *, train_split: str = "train", test_split: str = "test",
                      image_size: tuple[int, ...] = ()) -> Dataset:
  """Reads `path/<split>/<class>/<image>` for the train and test splits (GTSRB's layout).

  Classes are the training split's sub-folders in sorted order (GTSRB's 00000..00042 are
  classes 0..42); the test split's sub-folders must be among them. Files without an
  image extension (GTSRB's CSV files) are skipped and counted in the log; a file with
  one that does not decode is an error (linfjax/data/images.py).

  Args:
    path: the dataset's root folder.
    train_split, test_split: the split folders' names.
    image_size: (height, width) every image is resized to; () keeps the stored sizes,
      which must then all be equal.
  """
  if not os.path.isdir(path):
    raise DatasetError(f"{path}: no such directory (data.path should name a folder holding "
                       f"{train_split}/ and {test_split}/ with one folder per class)")
  class_names = tuple(_class_folders(os.path.join(path, train_split)))
  train_images, train_labels = _read_split(os.path.join(path, train_split), class_names,
                                           image_size)
  test_images, test_labels = _read_split(os.path.join(path, test_split), class_names, image_size)
  if train_images.shape[1:] != test_images.shape[1:]:
    raise DatasetError(f"{path}: the {train_split} images are {train_images.shape[1:]} but the "
                       f"{test_split} images are {test_images.shape[1:]}; set data.image_size")
  return Dataset(train_images, train_labels, test_images, test_labels, class_names)
