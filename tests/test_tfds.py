import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

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


@pytest.mark.parametrize("name,num_classes", [("cifar100", 100), ("svhn_cropped", 10)])
def test_other_tfds_datasets_by_name(name, num_classes):
  with tfds.testing.mock_data(num_examples=6):
    dataset = data.load_tfds(name)
    resized = data.load_tfds(name, image_size=(16, 8))
    source = tfds.data_source(name, split="train")
    raw = np.stack([np.asarray(source[i]["image"]) for i in range(6)])
  assert dataset.num_classes == num_classes
  assert dataset.train_images.shape == (6, 32, 32, 3)
  np.testing.assert_array_equal(dataset.train_images, raw)
  assert dataset.train_labels.min() >= 0 and dataset.train_labels.max() < num_classes
  assert resized.train_images.shape == (6, 16, 8, 3)
  expected = np.asarray(Image.fromarray(raw[3]).resize((8, 16), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(resized.train_images[3], expected)


def test_config_split_names_reach_tfds(monkeypatch):
  """Mock data ignores split names, so a stand-in records what `data.load` asks TFDS for."""
  asked, real = [], tfds.data_source

  def recording(name, *, split, **kwargs):
    asked.append((name, split))
    return real(name, split=split, **kwargs)

  monkeypatch.setattr(tfds, "data_source", recording)
  config = type("C", (), dict(source="tfds", name="svhn_cropped", data_dir="", image_size=(),
                               train_split="train[:90%]", test_split="extra", train_limit=0,
                               test_limit=0))
  with tfds.testing.mock_data(num_examples=4):
    data.load(config)
  assert asked == [("svhn_cropped", "train[:90%]"), ("svhn_cropped", "extra")]
