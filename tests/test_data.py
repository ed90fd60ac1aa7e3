import hashlib
import os
import pickle

import numpy as np
import pytest

from linfjax import data
from conftest import SHARED_SUBSET, write_cifar_dir


def test_loads_cifar_layout_channel_major(tmp_path):
  root = str(tmp_path / "c")
  raw, labels = write_cifar_dir(root, per_batch=7, num_test=5)
  dataset = data.load_cifar10_dir(root)
  assert dataset.train_images.shape == (35, 32, 32, 3)
  assert dataset.train_images.dtype == np.uint8
  assert dataset.test_images.shape == (5, 32, 32, 3)
  # Pixel (row 2, col 5) of image 3 in batch 1: red at 2*32+5, green +1024, blue +2048.
  flat = raw[0][3]
  np.testing.assert_array_equal(dataset.train_images[3, 2, 5], [flat[69], flat[1024 + 69],
                                                                flat[2048 + 69]])
  np.testing.assert_array_equal(dataset.train_labels, np.concatenate(labels[:5]))
  assert dataset.num_classes == 10


def test_accepts_the_batch_directory_itself(cifar_dir):
  dataset = data.load_cifar10_dir(os.path.join(cifar_dir, "cifar-10-batches-py"))
  assert len(dataset.train_labels) == 100


class _RunsCode:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_refuses_pickle_that_runs_code(cifar_dir):
  path = os.path.join(cifar_dir, "cifar-10-batches-py", "data_batch_2")
  with open(path, "wb") as f:
    pickle.dump({"data": _RunsCode(), "labels": []}, f, protocol=2)
  with pytest.raises(data.DatasetError, match=r"data_batch_2.*refusing to load global"):
    data.load_cifar10_dir(cifar_dir)


def test_truncated_file_is_named(cifar_dir):
  path = os.path.join(cifar_dir, "cifar-10-batches-py", "data_batch_3")
  payload = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(payload[:len(payload) // 2])
  with pytest.raises(data.DatasetError, match="data_batch_3.*corrupt or truncated"):
    data.load_cifar10_dir(cifar_dir)


def test_missing_directory_and_file(tmp_path, cifar_dir):
  with pytest.raises(data.DatasetError, match="no such directory"):
    data.load_cifar10_dir(str(tmp_path / "nowhere"))
  os.remove(os.path.join(cifar_dir, "cifar-10-batches-py", "test_batch"))
  with pytest.raises(data.DatasetError, match="test_batch: file not found"):
    data.load_cifar10_dir(cifar_dir)


def test_rejects_labels_out_of_range_and_bad_shapes(cifar_dir):
  path = os.path.join(cifar_dir, "cifar-10-batches-py", "data_batch_1")
  with open(path, "wb") as f:
    pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, f, protocol=2)
  with pytest.raises(data.DatasetError, match=r"labels outside 0..9"):
    data.load_cifar10_dir(cifar_dir)
  with open(path, "wb") as f:
    pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f, protocol=2)
  with pytest.raises(data.DatasetError, match=r"shape \(N, 3072\)"):
    data.load_cifar10_dir(cifar_dir)


def test_checksums_checked_when_present(cifar_dir):
  names = ["cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta"]
  lines = []
  for name in names:
    digest = hashlib.sha256(open(os.path.join(cifar_dir, name), "rb").read()).hexdigest()
    lines.append(f"{digest}  {name}\n")
  with open(os.path.join(cifar_dir, "SHA256SUMS"), "w") as f:
    f.writelines(lines)
  assert len(data.load_cifar10_dir(cifar_dir).test_labels) == 30
  with open(os.path.join(cifar_dir, names[0]), "ab") as f:
    f.write(b"x")
  with pytest.raises(data.DatasetError, match="test_batch: SHA-256 .* does not match"):
    data.load_cifar10_dir(cifar_dir)


@pytest.mark.skipif(not os.path.isdir(SHARED_SUBSET), reason="../shared subset not present")
def test_shared_subset_loads_with_its_checksums():
  dataset = data.load_cifar10_dir(SHARED_SUBSET)
  assert dataset.train_images.shape == (5085, 32, 32, 3)
  assert dataset.test_images.shape == (1017, 32, 32, 3)
  assert dataset.class_names[0] == "airplane"
  assert set(np.unique(dataset.test_labels)) == set(range(10))


def test_clean_set_is_seeded_and_disjoint():
  split = data.hold_out_clean_set(1000, 100, seed=3)
  again = data.hold_out_clean_set(1000, 100, seed=3)
  other = data.hold_out_clean_set(1000, 100, seed=4)
  np.testing.assert_array_equal(split.clean_set_indices, again.clean_set_indices)
  assert not np.array_equal(split.clean_set_indices, other.clean_set_indices)
  assert len(np.intersect1d(split.clean_set_indices, split.train_indices)) == 0
  assert len(split.clean_set_indices) + len(split.train_indices) == 1000


def test_limits_slice_both_splits(cifar_dir):
  config = type("C", (), dict(source="cifar10_dir", path=cifar_dir, train_limit=40,
                               test_limit=10))
  dataset = data.load(config)
  assert len(dataset.train_labels) == 40 and len(dataset.test_labels) == 10


def test_channel_stats_match_numpy(cifar_dir):
  dataset = data.load_cifar10_dir(cifar_dir)
  mean, std = dataset.channel_stats
  pixels = dataset.train_images.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-6)
  np.testing.assert_allclose(std, pixels.std(0), rtol=1e-6)


def test_padded_batches_keep_one_shape_and_count_real_rows():
  images = np.arange(7 * 2).reshape(7, 2).astype(np.uint8)
  labels = np.arange(7, dtype=np.int32)
  out = list(data.padded_batches(3, images, labels))
  assert [valid for _, valid in out] == [3, 3, 1]
  assert all(b.shape == (3, 2) and c.shape == (3,) for (b, c), _ in out)
  (last_images, last_labels), _ = out[-1]
  np.testing.assert_array_equal(last_images, [[12, 13], [0, 0], [0, 0]])
  np.testing.assert_array_equal(last_labels, [6, 0, 0])
  assert last_images.dtype == np.uint8
