"""The image-folder source on folders the tests write: good, corrupt, wrong size, bad layout."""

import os

import numpy as np
import pytest
from PIL import Image

from linfjax import data
from linfjax.data import images


def _write(path, array, format_name="PNG"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, format=format_name)


def _gtsrb_like(root, size=(6, 5), per_class=3, classes=("00000", "00001", "00002")):
  """<root>/{train,test}/<class>/*.ppm with a CSV beside them, as GTSRB ships; returns arrays."""
  rng = np.random.default_rng(0)
  written = {}
  for split in ("train", "test"):
    for label, name in enumerate(classes):
      for i in range(per_class):
        array = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        _write(os.path.join(root, split, name, f"{i:05d}.ppm"), array, "PPM")
        written[(split, label, i)] = array
      with open(os.path.join(root, split, name, f"GT-{name}.csv"), "w") as f:
        f.write("Filename;ClassId\n")
  return written


def test_good_folders_load_in_class_then_file_order(tmp_path):
  root = str(tmp_path / "gtsrb")
  written = _gtsrb_like(root)
  dataset = data.load_image_folder(root)
  assert dataset.class_names == ("00000", "00001", "00002")
  assert dataset.train_images.shape == (9, 6, 5, 3) and dataset.train_images.dtype == np.uint8
  np.testing.assert_array_equal(dataset.train_labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(dataset.train_images[4], written[("train", 1, 1)])
  np.testing.assert_array_equal(dataset.test_images[8], written[("test", 2, 2)])


def test_resizing_matches_pil_bilinear_and_goes_through_load(tmp_path):
  root = str(tmp_path / "gtsrb")
  written = _gtsrb_like(root, size=(11, 9))
  config = type("C", (), dict(source="image_folder", path=root, train_split="train",
                               test_split="test", image_size=(4, 4), train_limit=0,
                               test_limit=0))
  dataset = data.load(config)
  assert dataset.train_images.shape == (9, 4, 4, 3)
  expected = np.asarray(Image.fromarray(written[("train", 0, 2)]).resize(
      (4, 4), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(dataset.train_images[2], expected)


def test_corrupt_image_is_an_error_naming_the_file(tmp_path):
  root = str(tmp_path / "gtsrb")
  _gtsrb_like(root)
  bad = os.path.join(root, "train", "00001", "00002.ppm")
  with open(bad, "rb") as f:
    payload = f.read()
  with open(bad, "wb") as f:
    f.write(payload[:len(payload) // 2])
  with pytest.raises(data.DatasetError, match=r"00001/00002.ppm: not a readable image"):
    data.load_image_folder(root)
  with open(bad, "wb") as f:
    f.write(b"\x80\x04\x95 not an image, a pickle")
  with pytest.raises(data.DatasetError, match=r"00002.ppm: not a readable image"):
    data.load_image_folder(root)


def test_wrong_size_without_resizing_is_an_error_naming_the_file(tmp_path):
  root = str(tmp_path / "gtsrb")
  _gtsrb_like(root)
  odd = os.path.join(root, "test", "00002", "00001.ppm")
  _write(odd, np.zeros((7, 5, 3), np.uint8), "PPM")
  with pytest.raises(data.DatasetError, match=r"00002/00001.ppm is 5x7x3 .* set data.image_size"):
    data.load_image_folder(root)
  assert data.load_image_folder(root, image_size=(6, 5)).test_images.shape == (9, 6, 5, 3)


def test_layout_errors(tmp_path):
  root = str(tmp_path / "gtsrb")
  with pytest.raises(data.DatasetError, match="no such directory"):
    data.load_image_folder(root)
  _gtsrb_like(root)
  os.makedirs(os.path.join(root, "test", "00099"))
  with pytest.raises(data.DatasetError, match=r"class folder '00099' is not one of"):
    data.load_image_folder(root)
  os.rmdir(os.path.join(root, "test", "00099"))
  os.makedirs(os.path.join(root, "train", "00003"))
  with pytest.raises(data.DatasetError, match=r"00003: no image files"):
    data.load_image_folder(root)


def test_decoder_refuses_huge_claims_and_unlisted_formats(tmp_path, monkeypatch):
  path = str(tmp_path / "big.png")
  _write(path, np.zeros((20, 20, 3), np.uint8))
  monkeypatch.setattr(images, "MAX_PIXELS", 399)
  with pytest.raises(images.ImageError, match=r"20x20 pixels is more than the 399 allowed"):
    images.decode(path)
  ico = str(tmp_path / "icon.png")
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(ico, format="ICO")
  with pytest.raises(images.ImageError, match="not a readable image"):
    images.decode(ico)
