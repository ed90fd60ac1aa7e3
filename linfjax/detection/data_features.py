"""What the data-side detectors share: their error, their checks, the features they read, and
how a flagging is scored (precision and recall, STRIP's FRR and FAR).

The features of an image are the penultimate ones of a `LayeredClassifier`: the output of a
layer (by default the last, the model's probe layer L) pooled as the model's head pools it,
so with the default layer they are exactly what the dense head sees.
"""

from __future__ import annotations

import jax
import numpy as np

from linfjax import data, errors, pixels
from linfjax.models import HEAD_POOLS, LayeredClassifier


class DetectorError(errors.UserError, ValueError):
  """A detector's setting or input that cannot work (one line: what, the value, the range)."""


def check_fraction(name: str, value: float) -> float:
  """`value` if it lies in (0, 1); otherwise a one-line DetectorError."""
  if not 0.0 < float(value) < 1.0:
    raise DetectorError(f"{name}: must be a number in (0, 1), got {value!r}")
  return float(value)


def check_features(features, labels) -> tuple[np.ndarray, np.ndarray]:
  """[N, D] float64 features and [N] int labels, or a one-line DetectorError."""
  features = np.asarray(features, np.float64)
  labels = np.asarray(labels)
  if features.ndim != 2 or labels.shape != (features.shape[0],):
    raise DetectorError(f"features must be [N, D] and labels [N]; got {features.shape} and "
                        f"{labels.shape}")
  return features, labels.astype(np.int64)


def penultimate_features(model: LayeredClassifier, variables, images, *, batch_size: int,
                         layer: str | None = None) -> np.ndarray:
  """The pooled output of `layer` (default: the last, the head's input) for every image.

  Args:
    model: the classifier.
    variables: its variables.
    images: [N, H, W, C], uint8 pixels or floats in [0, 1] (anything sliceable).
    batch_size: images per forward pass; every batch is padded to it (one compilation).
    layer: the layer whose [B, H', W', K] output is pooled; None: the model's last layer.

  Returns:
    [N, K] float32.
  """
  layer = layer or model.default_probe
  pool = HEAD_POOLS[model.head_pool or model.DEFAULT_HEAD_POOL]

  @jax.jit
  def step(variables, batch):
    activation, _ = model.apply(variables, pixels.to_unit_float(batch), stop=layer)
    return pool(activation)

  out = []
  for (batch,), num_valid in data.padded_batches(batch_size, images):
    out.append(np.asarray(step(variables, batch))[:num_valid])
  return np.concatenate(out).astype(np.float32)


def precision_recall(flagged, poisoned_indices) -> tuple[float, float]:
  """Precision and recall of `flagged` indices against the truly poisoned ones.

  Precision is 1 when nothing is flagged (no false positive) and recall 1 when nothing is
  poisoned (nothing missed), so neither divides by zero.
  """
  flagged = set(np.asarray(flagged, np.int64).ravel().tolist())
  poisoned = set(np.asarray(poisoned_indices, np.int64).ravel().tolist())
  hits = len(flagged & poisoned)
  precision = hits / len(flagged) if flagged else 1.0
  recall = hits / len(poisoned) if poisoned else 1.0
  return precision, recall


def frr_far(flagged_clean, flagged_poisoned) -> tuple[float, float]:
  """STRIP's rates from boolean flags: FRR, the share of clean inputs flagged (rejected
  wrongly), and FAR, the share of poisoned inputs not flagged (accepted wrongly)."""
  flagged_clean = np.asarray(flagged_clean, bool).ravel()
  flagged_poisoned = np.asarray(flagged_poisoned, bool).ravel()
  frr = float(flagged_clean.mean()) if flagged_clean.size else 0.0
  far = float(1.0 - flagged_poisoned.mean()) if flagged_poisoned.size else 0.0
  return frr, far
