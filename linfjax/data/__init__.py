"""Datasets: the sources a config names, and how a run splits the training images.

    dataset = data.load(config.data)          # a Dataset of uint8 images and int32 labels
    split = data.clean_set_split(dataset, size=500, seed=0)   # the defender's clean set S

Sources (`SOURCES`): CIFAR-10's original layout (`cifar10_dir`), any prepared TFDS dataset
(`tfds`), a folder per class (`image_folder`) and GTSRB as it ships (`gtsrb`).
"""

from linfjax.data.cifar import (CIFAR_BATCH_DIR, CIFAR_META_FILE, CIFAR_TEST_FILE,
                                CIFAR_TRAIN_FILES, load_cifar10_dir)
from linfjax.data.dataset import (Dataset, DatasetError, Split, clean_set_from_training,
                                  hold_out_clean_set, padded_batches)
from linfjax.data.folder import load_image_folder
from linfjax.data.gtsrb import load_gtsrb
from linfjax.data.sources import SOURCES, clean_set_size, load
from linfjax.data.tfds_source import load_tfds


def clean_set_split(dataset: Dataset, *, size: int, seed: int,
                    from_training: bool = False) -> Split:
  """The defender's clean set S for this dataset: held out of training, as whole groups where
  the dataset has them (GTSRB's tracks), else images at random (`hold_out_clean_set`); or, with
  `from_training`, clean copies of training images that stay in training."""
  if from_training:
    return clean_set_from_training(len(dataset.train_labels), size, seed)
  return hold_out_clean_set(len(dataset.train_labels), size, seed, groups=dataset.train_groups,
                            labels=dataset.train_labels)


def split_for(dataset: Dataset, data_config, seed: int) -> Split:
  """The split a config's `data` block asks for."""
  return clean_set_split(dataset, size=clean_set_size(data_config, len(dataset.train_labels)),
                         seed=seed, from_training=data_config.clean_set_from == "training")


__all__ = [
    "CIFAR_BATCH_DIR", "CIFAR_META_FILE", "CIFAR_TEST_FILE", "CIFAR_TRAIN_FILES", "Dataset",
    "DatasetError", "SOURCES", "Split", "clean_set_from_training", "clean_set_size",
    "clean_set_split", "hold_out_clean_set", "load", "split_for",
    "load_cifar10_dir", "load_gtsrb", "load_image_folder", "load_tfds", "padded_batches",
]
