"""STRIP (Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks",
ACSAC 2019): a triggered input keeps its (target) prediction whatever it is blended with, so
its predictions under perturbation have low entropy.

Each input `x` is superimposed with `N` clean images `c_i` drawn from a held-out pool,
`0.5 x + 0.5 c_i` (an alpha blend), and scored by the mean over `i` of the Shannon entropy
(base 2) of the prediction on each blend. The threshold is the `frr` quantile (default 1 %) of
the entropies of clean inputs, so about that share of clean inputs is rejected; inputs below
it are flagged. FRR and FAR (`data_features.frr_far`) are the shares of clean inputs flagged
and of triggered inputs missed. Follows the paper; BackdoorBench's detection_infer/strip.py
(at 3f4b1a9) differs: it superimposes by addition, `x + alpha c` with alpha 1 and no
clipping, uses the natural log (a change of base scales every entropy alike, so the flags are
the same), N = 100 and a 10 % clean-set quantile. Here the overlays are drawn by a NumPy seed
(with replacement), and `predict_fn` is any function of float images in [0, 1] returning
probabilities, so it is tested without a model.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from linfjax import pixels
from linfjax.detection.data_features import DetectorError, check_fraction, frr_far

ALPHA = 0.5
NUM_OVERLAYS = 100
FRR = 0.01


def entropies(predict_fn: Callable, inputs, overlays, *, num_overlays: int = NUM_OVERLAYS,
              alpha: float = ALPHA, seed: int = 0, batch_size: int = 256) -> np.ndarray:
  """[len(inputs)] mean entropy (bits) of the predictions on each input's `num_overlays` blends
  `alpha * x + (1 - alpha) * c` with clean images `c` drawn from `overlays`."""
  if num_overlays < 1:
    raise DetectorError(f"num_overlays: must be an integer >= 1, got {num_overlays!r}")
  check_fraction("alpha", alpha)
  inputs = np.asarray(pixels.to_unit_float(inputs), np.float32)
  overlays = np.asarray(pixels.to_unit_float(overlays), np.float32)
  if len(overlays) == 0 or inputs.shape[1:] != overlays.shape[1:]:
    raise DetectorError(f"overlays must be a non-empty set of images shaped like the inputs; "
                        f"got {overlays.shape} for inputs {inputs.shape}")
  picks = np.random.default_rng(seed).integers(len(overlays), size=(len(inputs), num_overlays))
  per_step = max(1, batch_size // num_overlays)
  out = []
  for start in range(0, len(inputs), per_step):
    x = inputs[start:start + per_step]
    blends = alpha * x[:, None] + (1.0 - alpha) * overlays[picks[start:start + per_step]]
    probs = np.asarray(predict_fn(blends.reshape(-1, *x.shape[1:])), np.float64)
    probs = probs.reshape(len(x), num_overlays, -1)
    logs = np.log2(np.where(probs > 0, probs, 1.0))
    out.append(-(probs * logs).sum(-1).mean(-1))
  return np.concatenate(out)


class Result(NamedTuple):
  threshold: float  # Entropies below it are flagged.
  clean_entropy: np.ndarray  # [n_clean]
  suspect_entropy: np.ndarray  # [n_suspect]
  flagged: np.ndarray  # [n_suspect] bool
  frr: float  # Share of the clean inputs flagged.
  far: float  # Share of the suspect (triggered) inputs not flagged.


def detect(predict_fn: Callable, clean_inputs, suspect_inputs, overlays, *, frr: float = FRR,
           num_overlays: int = NUM_OVERLAYS, alpha: float = ALPHA, seed: int = 0,
           batch_size: int = 256) -> Result:
  """Thresholds on the clean inputs' entropies and flags the suspect (e.g. triggered) ones.

  `overlays` should be clean images other than `clean_inputs`; FAR treats every suspect
  input as triggered.
  """
  frr = check_fraction("frr", frr)
  kwargs = dict(num_overlays=num_overlays, alpha=alpha, batch_size=batch_size)
  clean = entropies(predict_fn, clean_inputs, overlays, seed=seed, **kwargs)
  suspect = entropies(predict_fn, suspect_inputs, overlays, seed=seed + 1, **kwargs)
  threshold = float(np.quantile(clean, frr))
  flagged = suspect < threshold
  measured_frr, far = frr_far(clean < threshold, flagged)
  return Result(threshold, clean, suspect, flagged, measured_frr, far)
