"""Shared test settings and helpers: strict rank promotion, tiny CIFAR-layout datasets."""

import os
import pickle

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_SUBSET = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data",
                                              "cifar10-subset"))


def write_cifar_dir(root, *, per_batch=20, num_test=30, seed=0, class_names=None):
  """Writes a small cifar-10-batches-py layout; returns (train images, labels) as loaded."""
  rng = np.random.default_rng(seed)
  class_names = class_names or [f"class{i}" for i in range(10)]
  batch_dir = os.path.join(root, "cifar-10-batches-py")
  os.makedirs(batch_dir, exist_ok=True)
  with open(os.path.join(batch_dir, "batches.meta"), "wb") as f:
    pickle.dump({"label_names": class_names, "num_vis": 3072}, f, protocol=2)
  all_data, all_labels = [], []
  for name, count in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", num_test)]:
    data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, len(class_names), count)]
    with open(os.path.join(batch_dir, name), "wb") as f:
      pickle.dump({"batch_label": name, "labels": labels, "data": data}, f, protocol=2)
    all_data.append(data)
    all_labels.append(labels)
  return all_data, all_labels


@pytest.fixture
def cifar_dir(tmp_path):
  root = str(tmp_path / "cifar")
  write_cifar_dir(root)
  return root
