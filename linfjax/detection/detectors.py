"""`DETECTORS`: the data-side backdoor detectors, each a function with a one-line description.

Spectral signatures and activation clustering take penultimate features and labels of a
training set (`data_features.penultimate_features`) and return the flagged indices; STRIP
takes a prediction function and images at inference. `precision_recall` and `frr_far` score
them. None of them is run by the pipeline; they are a library.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from linfjax.detection import activation_clustering, spectral_signatures, strip
from linfjax.detection.data_features import (DetectorError, frr_far, penultimate_features,
                                             precision_recall)


class Detector(NamedTuple):
  run: Callable
  description: str


DETECTORS: dict[str, Detector] = {
    "spectral_signatures": Detector(
        spectral_signatures.detect,
        "per class, the top 1.5 * eps * n squared projections on the top singular vector of "
        "the centred penultimate features (Tran et al. 2018)"),
    "activation_clustering": Detector(
        activation_clustering.detect,
        "per class, PCA to 10 dims and 2-means; the smaller cluster if under 35 % of the "
        "class (Chen et al. 2018)"),
    "strip": Detector(
        strip.detect,
        "at inference, mean prediction entropy over 0.5/0.5 blends with clean images, below "
        "the clean inputs' 1 % quantile (Gao et al. 2019)"),
}

__all__ = ["DETECTORS", "Detector", "DetectorError", "frr_far", "penultimate_features",
           "precision_recall"]
