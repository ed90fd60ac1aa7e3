"""CIFAR-10 in its original 'python version' layout (cifar-10-batches-py), of any size.

The batch files are pickles; they are read with an unpickler that admits only the globals
a CIFAR batch needs (numpy array reconstruction), so a tampered file cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle

import numpy as np

from linfjax.data.dataset import Dataset, DatasetError

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


def unpickle(path: str) -> dict:
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
  batch = unpickle(path)
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
  meta = unpickle(os.path.join(batch_dir, CIFAR_META_FILE))
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
