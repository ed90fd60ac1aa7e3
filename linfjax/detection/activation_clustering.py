"""Activation clustering (Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by
Activation Clustering", SafeAI@AAAI 2019): within a poisoned class the poisoned examples'
features form their own, smaller cluster.

For each class, the penultimate features are reduced to `dims` (10) dimensions, split into two
clusters by k-means, and the smaller cluster is flagged when its share of the class is below
`size_threshold` (0.35). This follows the paper and BackdoorBench's defense/ac.py (at 3f4b1a9,
after IBM ART's ClusteringHandler and ClusteringAnalyzer): PCA to 10 dims (ac.py passes
reduce='PCA'; ART's default, FastICA, is not used here either), 2-means, the "smaller" (size)
analysis. What differs: ac.py clusters each loader batch of `cluster_batch_size` images on its
own and concatenates the cluster ids, while this clusters each class's whole feature set; and
k-means is our NumPy k-means++ with Lloyd iterations, `restarts` seeded starts keeping the
lowest inertia, not sklearn's KMeans, so the result is deterministic for a seed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from linfjax.detection.data_features import DetectorError, check_features, check_fraction

DIMS = 10
SIZE_THRESHOLD = 0.35


def _check_dims(dims: int, num_features: int) -> None:
  if not 1 <= dims <= num_features:
    raise DetectorError(f"dims: must be an integer in [1, {num_features}] (the number of "
                        f"features), got {dims!r}")


def pca(features, dims: int) -> np.ndarray:
  """[n, dims] projections of the centred `features` on their top `dims` singular vectors."""
  features = np.asarray(features, np.float64)
  _check_dims(dims, features.shape[1])
  centred = features - features.mean(axis=0, keepdims=True)
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  return centred @ vt[:dims].T


def _lloyd(points: np.ndarray, centres: np.ndarray, iterations: int):
  for _ in range(iterations):
    distances = np.square(points[:, None, :] - centres[None, :, :]).sum(-1)
    assignment = distances.argmin(axis=1)
    updated = np.stack([points[assignment == j].mean(axis=0) if np.any(assignment == j)
                        else centres[j] for j in range(len(centres))])
    if np.allclose(updated, centres):
      break
    centres = updated
  distances = np.square(points[:, None, :] - centres[None, :, :]).sum(-1)
  return distances.argmin(axis=1), float(distances.min(axis=1).sum())


def kmeans(points, k: int = 2, *, seed: int = 0, restarts: int = 4,
           iterations: int = 100) -> np.ndarray:
  """[n] cluster ids in [0, k) from k-means++ starts and Lloyd iterations (lowest inertia)."""
  points = np.asarray(points, np.float64)
  if not 1 <= k <= len(points):
    raise DetectorError(f"k: must be an integer in [1, {len(points)}] (the number of points), "
                        f"got {k!r}")
  rng = np.random.default_rng(seed)
  best, best_inertia = None, np.inf
  for _ in range(restarts):
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, k):
      gap = np.square(points[:, None, :] - np.asarray(centres)[None]).sum(-1).min(axis=1)
      total = gap.sum()
      pick = rng.choice(len(points), p=gap / total) if total > 0 else rng.integers(len(points))
      centres.append(points[pick])
    assignment, inertia = _lloyd(points, np.asarray(centres), iterations)
    if inertia < best_inertia:
      best, best_inertia = assignment, inertia
  return best


def detect(features, labels, *, dims: int = DIMS, size_threshold: float = SIZE_THRESHOLD,
           seed: int = 0, classes: Sequence[int] | None = None) -> np.ndarray:
  """Indices (into `features`) flagged as poisoned, sorted.

  Args:
    features: [N, D] penultimate features of the training set.
    labels: [N] the (possibly poisoned) training labels.
    dims: PCA dimensions, in [1, D].
    size_threshold: in (0, 1); the smaller cluster is flagged when its share is below it.
    seed: k-means's seed.
    classes: the classes to scan; None: every label present.
  """
  size_threshold = check_fraction("size_threshold", size_threshold)
  features, labels = check_features(features, labels)
  _check_dims(dims, features.shape[1])
  flagged = []
  for c in (np.unique(labels) if classes is None else classes):
    members = np.flatnonzero(labels == c)
    if len(members) < 2:
      continue
    reduced = pca(features[members], min(dims, len(members)))
    assignment = kmeans(reduced, 2, seed=seed)
    sizes = np.bincount(assignment, minlength=2)
    smaller = int(np.argmin(sizes))
    if sizes[smaller] / len(members) < size_threshold:
      flagged.append(members[assignment == smaller])
  return np.sort(np.concatenate(flagged)) if flagged else np.zeros(0, np.int64)
