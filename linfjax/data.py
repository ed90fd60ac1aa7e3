"""Datasets as uint8 arrays: CIFAR-10's original directory layout, any TFDS image
classification dataset by name, or a folder of one sub-folder of images per class.

Every source gives a `Dataset` of NHWC uint8 images and int32 labels; the training
code moves them to the device once. Nothing here falls back to other data: a
missing, truncated or tampered file is a `DatasetError` that names the path and
what is wrong.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import pickle
from typing import Iterator

import numpy as np
from absl import logging

from linfjax import images as image_files

from linfjax import errors


class DatasetError(errors.UserError, ValueError):
  """A dataset is missing, unreadable, or not what its format promises."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Images are uint8 [N, H, W, C]; labels int32 [N] in [0, num_classes)."""
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])

  @functools.cached_property
  def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the training images in [0, 1] (the model's input layer).

    Computed once per dataset: every model a run (or a grid) builds asks for it.
    """
    pixels = self.train_images.reshape(-1, self.train_images.shape[-1]).astype(np.float64) / 255.0
    return tuple(pixels.mean(0).tolist()), tuple(np.maximum(pixels.std(0), 1e-3).tolist())


# --- cifar-10-batches-py ------------------------------------------------------------

CIFAR_BATCH_DIR = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_META_FILE = "batches.meta"


class _RefusedGlobal(pickle.UnpicklingError):
  """The pickle asked for a global outside the allow-list."""


class _CifarUnpickler(pickle.Unpickler):
  """Admits only the globals a cifar-10-batches-py file needs: numpy array reconstruction.

  `_codecs.encode` is how a protocol-2 pickle written by Python 3 spells a bytes
  object (the array's buffer); it only turns a string into bytes.
  """

  _ALLOWED = {
      ("_codecs", "encode"),
      ("numpy.core.multiarray", "_reconstruct"),
      ("numpy._core.multiarray", "_reconstruct"),
      ("numpy", "ndarray"),
      ("numpy", "dtype"),
  }

  def find_class(self, module: str, name: str):
    if (module, name) not in self._ALLOWED:
      raise _RefusedGlobal(f"refusing to load global {module}.{name}: a CIFAR batch "
                                   "file holds only numpy arrays, lists and strings")
    return super().find_class(module, name)


def _unpickle(path: str) -> dict:
  try:
    with open(path, "rb") as f:
      payload = f.read()
  except FileNotFoundError:
    raise DatasetError(f"{path}: file not found (expected the cifar-10-batches-py layout)") from None
  try:
    obj = _CifarUnpickler(io.BytesIO(payload), encoding="latin1").load()
  except _RefusedGlobal as e:
    raise DatasetError(f"{path}: not a safe CIFAR batch pickle: {e}") from None
  except Exception as e:  # Truncated or garbled files raise many exception types.
    raise DatasetError(f"{path}: corrupt or truncated pickle ({type(e).__name__}: {e})") from None
  if not isinstance(obj, dict):
    raise DatasetError(f"{path}: expected a dict, found {type(obj).__name__}")
  return obj


def _read_batch(path: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  batch = _unpickle(path)
  for key in ("data", "labels"):
    if key not in batch:
      raise DatasetError(f"{path}: missing key {key!r} (found {sorted(batch)})")
  data = batch["data"]
  if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
      or data.shape[1] != 3072:
    shape = getattr(data, "shape", None)
    dtype = getattr(data, "dtype", type(data).__name__)
    raise DatasetError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {dtype} {shape}")
  labels = np.asarray(batch["labels"])
  if labels.ndim != 1 or labels.shape[0] != data.shape[0] or labels.dtype.kind not in "iu":
    raise DatasetError(f"{path}: 'labels' must be {data.shape[0]} integers, got "
                       f"{labels.dtype} {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DatasetError(f"{path}: labels outside 0..{num_classes - 1} "
                       f"(min {labels.min()}, max {labels.max()})")
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int32)


def _verify_checksums(root: str) -> None:
  """Checks every file listed in `root/SHA256SUMS`, when that file exists."""
  sums_path = os.path.join(root, "SHA256SUMS")
  if not os.path.exists(sums_path):
    return
  with open(sums_path) as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      parts = line.split()
      if len(parts) != 2:
        raise DatasetError(f"{sums_path}:{line_number}: expected '<sha256>  <file>'")
      expected, name = parts[0], parts[1].lstrip("*")
      path = os.path.join(root, name)
      if not os.path.exists(path):
        raise DatasetError(f"{path}: listed in {sums_path} but missing")
      digest = hashlib.sha256()
      with open(path, "rb") as g:
        for chunk in iter(lambda: g.read(1 << 20), b""):
          digest.update(chunk)
      if digest.hexdigest() != expected:
        raise DatasetError(f"{path}: SHA-256 {digest.hexdigest()} does not match {expected} "
                           f"in {sums_path}; the file is corrupt or was changed")


def load_cifar10_dir(path: str) -> Dataset:
  """Reads CIFAR-10 in its original 'python version' layout, of any size.

  Args:
    path: the `cifar-10-batches-py` directory, or a directory that contains it.
      A `SHA256SUMS` file in `path` is checked when present.
  """
  if not os.path.isdir(path):
    raise DatasetError(f"{path}: no such directory (data.path should name a "
                       f"{CIFAR_BATCH_DIR} directory or its parent); to download CIFAR-10 "
                       "and write the quick subset, run `python -m linfjax.fetch DIR`, then "
                       "pass --config.data.path=DIR/cifar10-subset")
  _verify_checksums(path)
  batch_dir = os.path.join(path, CIFAR_BATCH_DIR)
  if not os.path.isdir(batch_dir):
    batch_dir = path
  meta = _unpickle(os.path.join(batch_dir, CIFAR_META_FILE))
  names = meta.get("label_names")
  if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
    raise DatasetError(f"{os.path.join(batch_dir, CIFAR_META_FILE)}: 'label_names' must be "
                       "a list of class names")
  train = [_read_batch(os.path.join(batch_dir, name), len(names)) for name in CIFAR_TRAIN_FILES]
  test_images, test_labels = _read_batch(os.path.join(batch_dir, CIFAR_TEST_FILE), len(names))
  return Dataset(
      train_images=np.concatenate([images for images, _ in train]),
      train_labels=np.concatenate([labels for _, labels in train]),
      test_images=test_images,
      test_labels=test_labels,
      class_names=tuple(names),
  )


# --- TFDS ---------------------------------------------------------------------------

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
    images = _stack(arrays, lambda i, split=split: f"TFDS {name!r} {split!r} example {i}")
    labels = np.asarray([int(r["label"]) for r in records], dtype=np.int32)
    splits[role] = (images, labels)
    class_names = tuple(features["label"].names)
  return Dataset(splits["train"][0], splits["train"][1], splits["test"][0], splits["test"][1],
                 class_names)


def _stack(arrays: list[np.ndarray], describe) -> np.ndarray:
  """Stacks images of one shape; a different one is a DatasetError naming `describe(i)`."""
  if not arrays:
    raise DatasetError(f"{describe(0)}: no images")
  for i, array in enumerate(arrays):
    if array.shape != arrays[0].shape:
      raise DatasetError(f"{describe(i)} is {array.shape[1]}x{array.shape[0]}x{array.shape[2]} "
                         f"(width x height x channels) but {describe(0)} is "
                         f"{arrays[0].shape[1]}x{arrays[0].shape[0]}x{arrays[0].shape[2]}; set "
                         "data.image_size=(height, width) to resize every image")
  return np.stack(arrays)


# --- one folder per class -------------------------------------------------------------

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
  return _stack(arrays, lambda i: paths[i]), np.asarray(labels, np.int32)


def load_image_folder(path: str, *, train_split: str = "train", test_split: str = "test",
                      image_size: tuple[int, ...] = ()) -> Dataset:
  """Reads `path/<split>/<class>/<image>` for the train and test splits (GTSRB's layout).

  Classes are the training split's sub-folders in sorted order (GTSRB's 00000..00042 are
  classes 0..42); the test split's sub-folders must be among them. Files without an
  image extension (GTSRB's CSV files) are skipped and counted in the log; a file with
  one that does not decode is an error (linfjax/images.py).

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


def load(data_config) -> Dataset:
  """Loads the dataset a config's `data` block names, sliced by train/test limits."""
  if data_config.source == "cifar10_dir":
    dataset = load_cifar10_dir(os.path.expanduser(data_config.path))
  elif data_config.source == "tfds":
    dataset = load_tfds(data_config.name, data_config.data_dir,
                        train_split=data_config.train_split, test_split=data_config.test_split,
                        image_size=tuple(data_config.image_size))
  elif data_config.source == "image_folder":
    dataset = load_image_folder(os.path.expanduser(data_config.path),
                                train_split=data_config.train_split,
                                test_split=data_config.test_split,
                                image_size=tuple(data_config.image_size))
  else:
    raise DatasetError(f"unknown data source {data_config.source!r}")
  return _limit(dataset, data_config.train_limit, data_config.test_limit)


def _limit(dataset: Dataset, train_limit: int, test_limit: int) -> Dataset:
  train = slice(None, train_limit or None)
  test = slice(None, test_limit or None)
  return dataclasses.replace(
      dataset, train_images=dataset.train_images[train], train_labels=dataset.train_labels[train],
      test_images=dataset.test_images[test], test_labels=dataset.test_labels[test])


@dataclasses.dataclass(frozen=True)
class Split:
  """How a run divides the training images: the defender's clean set S and the rest."""
  clean_set_indices: np.ndarray  # int64 [|S|], indices into the training images.
  train_indices: np.ndarray  # int64 [N - |S|], the images models train on.


def hold_out_clean_set(num_train: int, size: int, seed: int) -> Split:
  """Draws the defender's clean set S (seeded), disjoint from the training images."""
  if not 0 < size < num_train:
    raise ValueError(f"clean set size {size} must be in [1, {num_train})")
  order = np.random.default_rng([seed, 0x5E7]).permutation(num_train)
  return Split(clean_set_indices=np.sort(order[:size]), train_indices=np.sort(order[size:]))


def padded_batches(batch_size: int, *arrays: np.ndarray) -> Iterator[tuple[tuple, int]]:
  """Fixed-size batches of equally long arrays, the last one zero-padded.

  One shape for every batch means one compiled function serves a whole split.

  Yields:
    (one [batch_size, ...] batch per array, how many leading rows are real).

  Raises:
    ValueError: when the arrays differ in length (a shorter one would be zero-padded into
      wrong rows), or batch_size < 1.
  """
  lengths = [len(a) for a in arrays]
  if not arrays or len(set(lengths)) != 1 or batch_size < 1:
    raise ValueError(f"padded_batches needs arrays of one length and batch_size >= 1; got "
                     f"lengths {lengths}, batch_size {batch_size}")
  for start in range(0, lengths[0], batch_size):
    batch = tuple(np.asarray(a[start:start + batch_size]) for a in arrays)
    num_valid = len(batch[0])
    if num_valid < batch_size:
      batch = tuple(np.concatenate([b, np.zeros((batch_size - num_valid, *b.shape[1:]), b.dtype)])
                    for b in batch)
    yield batch, num_valid
