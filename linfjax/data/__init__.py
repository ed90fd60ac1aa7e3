"""Datasets: the sources a config names, and how a run splits the training images.

    dataset = data.load(config.data)          # a Dataset of uint8 images and int32 labels
    split = data.clean_set_split(dataset, size=500, seed=0)   # the defender's clean set S

Sources (`SOURCES`): CIFAR-10's original layout (`cifar10_dir`), any prepared TFDS dataset
(`tfds`), a folder per class (`image_folder`) and GTSRB as it ships (`gtsrb`).
"""

from linfjax.data.cifar import (CIFAR_BATCH_DIR, CIFAR_META_FILE, CIFAR_TEST_FILE,
                                CIFAR_TRAIN_FILES, load_cifar10_dir)
from linfjax.data.dataset import (Dataset, DatasetError, Split, hold_out_clean_set,
                                  padded_batches)
from linfjax.data.folder import load_image_folder
from linfjax.data.gtsrb import load_gtsrb
from linfjax.data.sources import SOURCES, load
from linfjax.data.tfds_source import load_tfds


def clean_set_split(dataset: Dataset, *, size: int, seed: int) -> Split:
  """The defender's clean set S for this dataset: whole groups where it has them (GTSRB's
  tracks), else images at random (`hold_out_clean_set`)."""
  return hold_out_clean_set(len(dataset.train_labels), size, seed, groups=dataset.train_groups,
                            labels=dataset.train_labels)


__all__ = [
    "CIFAR_BATCH_DIR", "CIFAR_META_FILE", "CIFAR_TEST_FILE", "CIFAR_TRAIN_FILES", "Dataset",
    "DatasetError", "SOURCES", "Split", "clean_set_split", "hold_out_clean_set", "load",
    "load_cifar10_dir", "load_gtsrb", "load_image_folder", "load_tfds", "padded_batches",
]
