"""Spectral signatures (Tran, Li and Madry, NeurIPS 2018): poisoned training examples leave a
trace along the top singular direction of their class's centred features.

For each class `c` with features `F_c` ([n_c, D], penultimate layer), centre them,
`G = F_c - mean(F_c)`, take the top right-singular vector `v` of `G` and score every example
by its squared projection `(G v)^2`; the `floor(1.5 * eps * n_c)` highest scores of the class
are flagged, with `eps` the expected poison fraction. This follows the paper (its score is the
squared correlation of the *centred* example with `v`). BackdoorBench's defense/spectral.py
(at 1d8e4bc) differs: it projects the uncentred features on `v` and scores `|F v|` (which
ranks like ours only when the class mean is orthogonal to `v`), flags the scores above its
config's `percentile`, takes the flattened last-block map rather than the pooled features, and
scans the target class(es) or all; here every class is scanned unless `classes` is given, and
the flagged indices are returned rather than a retrained model.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from linfjax.detection.data_features import check_features, check_fraction

# The paper removes 1.5 times the expected number of poisoned examples per class.
REMOVAL_FACTOR = 1.5


def scores(features) -> np.ndarray:
  """Squared projections of centred `features` ([n, D]) on their top right-singular vector."""
  features = np.asarray(features, np.float64)
  centred = features - features.mean(axis=0, keepdims=True)
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  return np.square(centred @ vt[0])


def detect(features, labels, *, expected_poison_fraction: float,
           classes: Sequence[int] | None = None) -> np.ndarray:
  """Indices (into `features`) flagged as poisoned, sorted.

  Args:
    features: [N, D] penultimate features of the training set.
    labels: [N] the (possibly poisoned) training labels.
    expected_poison_fraction: `eps` in (0, 1).
    classes: the classes to scan; None: every label present.
  """
  eps = check_fraction("expected_poison_fraction", expected_poison_fraction)
  features, labels = check_features(features, labels)
  flagged = []
  for c in (np.unique(labels) if classes is None else classes):
    members = np.flatnonzero(labels == c)
    count = min(len(members), int(np.floor(REMOVAL_FACTOR * eps * len(members))))
    if count == 0 or len(members) < 2:
      continue
    order = np.argsort(-scores(features[members]), kind="stable")
    flagged.append(members[order[:count]])
  return np.sort(np.concatenate(flagged)) if flagged else np.zeros(0, np.int64)
