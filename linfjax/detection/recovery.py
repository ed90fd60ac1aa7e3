"""How well a reverse-engineered mask recovers a trigger that has a region (a patch).

A mask can send images to the target without touching the real trigger's region R: a model
that learned "white pixels anywhere" from a white patch is flipped by white dots elsewhere,
and Neural Cleanse finds those. Two numbers say whether the synthetic trigger is the real
one:
  - share: the mask's mass inside R, `sum_R m / sum m` (1: all of it on the patch);
  - IoU: the overlap of the mask's |R| largest pixels with R, `|top ∩ R| / |top ∪ R|`.
Triggers that act on the whole image (blend, SIG, WaNet) have no region to compare with.
"""

from __future__ import annotations

import numpy as np
from jax.typing import ArrayLike


def has_region(region: ArrayLike) -> bool:
  """Whether a trigger's region ([H, W] bool) leaves part of the image untouched."""
  region = np.asarray(region, bool)
  return bool(region.any() and not region.all())


def recovery(mask: ArrayLike, region: ArrayLike) -> dict[str, float]:
  """The share of `mask`'s mass inside `region` and the IoU of its top-|region| pixels.

  Args:
    mask: [H, W] (or [H, W, 1]) non-negative mask values.
    region: [H, W] bool, the real trigger's region, neither empty nor the whole image.

  Returns:
    {"share": float in [0, 1], "iou": float in [0, 1]}; ties among the mask's values are
    broken by pixel order (row-major), so the result is deterministic.
  """
  mask = np.asarray(mask, np.float64).reshape(np.shape(region))
  region = np.asarray(region, bool)
  if not has_region(region):
    raise ValueError("the region must be neither empty nor the whole image")
  total = mask.sum()
  share = float(mask[region].sum() / total) if total > 0 else 0.0
  size = int(region.sum())
  top = np.zeros(mask.size, bool)
  top[np.argsort(-mask.ravel(), kind="stable")[:size]] = True
  inside = region.ravel()
  iou = float((top & inside).sum() / (top | inside).sum())
  return {"share": share, "iou": iou}
