"""What every data source gives: a `Dataset` of uint8 images, and how a run splits it.

Every source (linfjax/data/sources.py) returns a `Dataset` of NHWC uint8 images and int32
labels; the training code moves them to the device once. Nothing falls back to other data:
a missing, truncated or tampered file is a `DatasetError` that names the path and what is
wrong. `hold_out_clean_set` draws the defender's clean set S: images at random, or, where
a source knows that images come in groups of near-duplicates (GTSRB's tracks, ~30 frames of
one physical sign), whole groups, so no group has members both in training and in S.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import numpy as np

from linfjax import errors, keys


class DatasetError(errors.UserError, ValueError):
  """A dataset is missing, unreadable, or not what its format promises."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Images are uint8 [N, H, W, C]; labels int32 [N] in [0, num_classes).

  `train_groups`, when a source has them, is int64 [N]: training images with the same value
  are near-duplicates (GTSRB: frames of one track) and are held out together.
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...]
  train_groups: np.ndarray | None = None

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


def limit(dataset: Dataset, train_limit: int, test_limit: int) -> Dataset:
  """The first `train_limit` training and `test_limit` test images (0: all)."""
  train = slice(None, train_limit or None)
  test = slice(None, test_limit or None)
  groups = None if dataset.train_groups is None else dataset.train_groups[train]
  return dataclasses.replace(
      dataset, train_images=dataset.train_images[train], train_labels=dataset.train_labels[train],
      test_images=dataset.test_images[test], test_labels=dataset.test_labels[test],
      train_groups=groups)


def stack_images(arrays: list[np.ndarray], describe) -> np.ndarray:
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


@dataclasses.dataclass(frozen=True)
class Split:
  """How a run divides the training images: the defender's clean set S and the rest."""
  clean_set_indices: np.ndarray  # int64 [|S|], indices into the training images.
  train_indices: np.ndarray  # int64 [N - |S|], the images models train on.


def hold_out_clean_set(num_train: int, size: int, seed: int, *,
                       groups: np.ndarray | None = None,
                       labels: np.ndarray | None = None) -> Split:
  """Draws the defender's clean set S (seeded), disjoint from the training images.

  Without `groups`, S is `size` images drawn at random. With `groups` ([N] ints), S is made
  of whole groups, taken class by class in turn (each class's groups in a seeded order, the
  classes in a seeded order, one group of each class per round) until S holds at least
  `size` images; so S covers as many classes as its size allows and no group is split
  between training and S.
  """
  if not 0 < size < num_train:
    raise ValueError(f"clean set size {size} must be in [1, {num_train})")
  rng = keys.numpy_rng(seed, keys.CLEAN_SET)
  if groups is None:
    order = rng.permutation(num_train)
    return Split(clean_set_indices=np.sort(order[:size]), train_indices=np.sort(order[size:]))
  groups = np.asarray(groups)
  labels = np.zeros(num_train, np.int64) if labels is None else np.asarray(labels)
  if groups.shape != (num_train,) or labels.shape != (num_train,):
    raise ValueError(f"groups {groups.shape} and labels {labels.shape} must be [{num_train}]")
  unique, first, members = np.unique(groups, return_index=True, return_inverse=True)
  group_class = labels[first]
  queues = [list(rng.permutation(np.flatnonzero(group_class == c)))
            for c in rng.permutation(np.unique(group_class))]
  sizes = np.bincount(members, minlength=len(unique))
  taken, count = [], 0
  while count < size:
    for queue in queues:
      if queue and count < size:
        group = queue.pop(0)
        taken.append(group)
        count += sizes[group]
  in_clean_set = np.isin(members, taken)
  if in_clean_set.all():
    raise ValueError(f"a clean set of {size} images in whole groups leaves no training images")
  return Split(clean_set_indices=np.flatnonzero(in_clean_set),
               train_indices=np.flatnonzero(~in_clean_set))


def clean_set_from_training(num_train: int, size: int, seed: int) -> Split:
  """S as clean copies of `size` training images (seeded), which stay in training: the
  defender's data the model has seen, as BackdoorBench gives its defenses."""
  if not 0 < size <= num_train:
    raise ValueError(f"clean set size {size} must be in [1, {num_train}]")
  chosen = keys.numpy_rng(seed, keys.CLEAN_SET).permutation(num_train)[:size]
  return Split(clean_set_indices=np.sort(chosen), train_indices=np.arange(num_train))


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
