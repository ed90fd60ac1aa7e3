"""Neural Cleanse measured as a detector over many models: rates, AUROC, a chosen threshold.

Each model's reverse engineering gives every class's mask norm; a statistic (`outliers.
STATISTICS`) turns them into indices, and the model's *score* is the largest index among the
classes below the median norm (those that can be flagged). With a threshold t:
  - a backdoored model's target is flagged when its score exceeds t and the class it belongs
    to is the attack's target (a true positive); a wrong class is flagged when the score
    exceeds t at another class;
  - a vanilla model is flagged (a false positive) when its score exceeds t.
The AUROC of the scores separates backdoored from vanilla models with no threshold (ties
count one half). `choose_threshold` picks t on calibration models only, so that the rates on
other models are a held-out test.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from linfjax.detection import outliers


@dataclasses.dataclass(frozen=True)
class Model:
  """One model's reverse engineering: mask l1 norms [K], which classes succeeded [K], and the
  attack's target (None for a vanilla model)."""
  mask_l1: np.ndarray
  succeeded: np.ndarray
  target: int | None


def score(model: Model, statistic: str) -> tuple[float, int | None]:
  """(The largest index below the median norm, its class); (0.0, None) when none is below."""
  norms = np.asarray(model.mask_l1, np.float64)
  succeeded = np.asarray(model.succeeded, bool)
  index = outliers.STATISTICS[statistic].index(norms, succeeded)
  if succeeded.sum() < outliers.MIN_CLASSES:
    return 0.0, None
  below = succeeded & (norms < np.median(norms[succeeded]))
  if not below.any():
    return 0.0, None
  values = np.where(below, np.nan_to_num(index, nan=0.0, posinf=np.finfo(np.float64).max), -1.0)
  best = int(np.argmax(values))
  return float(values[best]), best


@dataclasses.dataclass(frozen=True)
class Rates:
  """Counts of one statistic and threshold over a set of models."""
  target_flagged: int
  wrong_flagged: int
  backdoored: int
  vanilla_flagged: int
  vanilla: int
  auroc: float | None

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float | None:
  """P(a positive score > a negative one) + P(tie) / 2; None without both kinds."""
  positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
  if not len(positive) or not len(negative):
    return None
  greater = (positive[:, None] > negative[None, :]).mean()
  ties = (positive[:, None] == negative[None, :]).mean()
  return float(greater + ties / 2)


def rates(models: Sequence[Model], statistic: str, threshold: float) -> Rates:
  """What a statistic flags at `threshold` over backdoored and vanilla models."""
  target = wrong = flagged_vanilla = 0
  positive, negative = [], []
  for model in models:
    value, flagged_class = score(model, statistic)
    if model.target is None:
      negative.append(value)
      flagged_vanilla += value > threshold
    else:
      positive.append(value)
      if value > threshold:
        target += flagged_class == model.target
        wrong += flagged_class != model.target
  return Rates(target, wrong, len(positive), flagged_vanilla, len(negative),
               auroc(positive, negative))


def choose_threshold(models: Sequence[Model], statistic: str) -> float:
  """The threshold that best separates the calibration models: the largest of those that
  maximise (targets flagged - vanilla models flagged) / their counts (Youden's J), among the
  midpoints between consecutive scores; the statistic's default when no threshold flags a
  target there."""
  scores = sorted({score(model, statistic)[0] for model in models})
  candidates = [(a + b) / 2 for a, b in zip(scores, scores[1:])]
  best, best_j = outliers.STATISTICS[statistic].default_threshold, 0.0
  for threshold in candidates:
    counted = rates(models, statistic, threshold)
    j = (counted.target_flagged / max(counted.backdoored, 1)
         - counted.vanilla_flagged / max(counted.vanilla, 1))
    if j > best_j or (j == best_j and j > 0 and threshold > best):
      best, best_j = threshold, j
  return float(best)
