import numpy as np
import pytest
import tensorflow_datasets as tfds

from linfjax import data


def test_tfds_source_under_mock_data():
  with tfds.testing.mock_data(num_examples=12):
    dataset = data.load_tfds("cifar10")
  assert dataset.train_images.shape == (12, 32, 32, 3)
  assert dataset.train_images.dtype == np.uint8
  assert dataset.test_images.shape[1:] == (32, 32, 3)
  assert dataset.num_classes == 10
  assert dataset.train_labels.min() >= 0 and dataset.train_labels.max() < 10


def test_unknown_tfds_name_is_a_clear_error():
  with pytest.raises(data.DatasetError, match="no_such_dataset"):
    data.load_tfds("no_such_dataset")
