"""Any prepared TFDS image-classification dataset, by name, through `tfds.data_source`."""

from __future__ import annotations

import numpy as np

from linfjax.data import images as image_files
from linfjax.data.dataset import Dataset, DatasetError, stack_images


def load_tfds(name: str, data_dir: str | None = None, *, train_split: str = "train",
              test_split: str = "test", image_size: tuple[int, ...] = ()) -> Dataset:
  """Reads a prepared TFDS image-classification dataset through `tfds.data_source`.

  Random access needs no TensorFlow, but the dataset must be prepared already in the
  array_record format (`tfds build NAME --file_format=array_record`); nothing is
  downloaded here.

  Args:
    name: the TFDS name, e.g. "cifar10", "cifar100", "svhn_cropped".
    data_dir: TFDS's data directory; None or "" for its default.
    train_split, test_split: TFDS split names (slices such as "train[:90%]" work too).
    image_size: (height, width) to resize every image to; () keeps the stored size, which
      must then be one size for the whole dataset.
  """
  import tensorflow_datasets as tfds  # Imported here: it is slow to import.

  splits = {}
  for role, split in (("train", train_split), ("test", test_split)):
    try:
      source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise DatasetError(
          f"TFDS dataset {name!r} (split {split!r}, data_dir {data_dir or 'TFDS default'}) "
          f"cannot be opened: {reason}. Prepare it with `tfds build {name} "
          "--file_format=array_record`, or use data.source='cifar10_dir'.") from None
    features = source.dataset_info.features
    if "image" not in features or "label" not in features:
      raise DatasetError(f"TFDS dataset {name!r} has features {list(features)}; linfjax "
                         "needs an image classification dataset with 'image' and 'label'")
    records = [source[i] for i in range(len(source))]
    arrays = [np.asarray(r["image"], dtype=np.uint8) for r in records]
    if image_size:
      arrays = [image_files.resize(a, tuple(image_size)) for a in arrays]
    images = stack_images(arrays, lambda i, split=split: f"TFDS {name!r} {split!r} example {i}")
    labels = np.asarray([int(r["label"]) for r in records], dtype=np.int32)
    splits[role] = (images, labels)
    class_names = tuple(features["label"].names)
  return Dataset(splits["train"][0], splits["train"][1], splits["test"][0], splits["test"][1],
                 class_names)
