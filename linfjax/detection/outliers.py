"""Which class's reverse-engineered trigger is an outlier: the anomaly index and the suspect.

Neural Cleanse's anomaly index of class `c` is `|n_c - median(n)| / (1.4826 * MAD(n))` over
the classes' mask norms `n` (docs/method.md, "Synthetic trigger"); only classes below the median
can be flagged, and the flagged target is the one of smallest norm among those whose index
exceeds the threshold (2). Choices here that are ours:
  - a class whose reverse engineering never reached the attack-success threshold has no
    trigger, only an unregularised mask: it is left out of the median and the MAD and can be
    neither flagged nor suspected;
  - `STATISTICS` offers other indices beside NC's: "log", NC's index on the logarithms of
    the norms, and "ratio", `median(n) / n_c`, how many times smaller than the median a
    mask is. With ten classes the MAD is itself noisy: the classes' natural minimal triggers
    differ by a factor of two or three (vehicles against animals), so a spread-out model
    hides a clear outlier and a tight one inflates a small deviation. The ratio measures the
    effect size alone; README "Defaults we chose" has the measurements behind the default.
    Each statistic has its own default threshold (`Statistic.default_threshold`).
Whether or not a class is flagged, the *suspect* is the class of smallest norm among those
that succeeded: the defender's best guess, whose trigger the defense uses.

References:
  Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
  Networks", IEEE S&P 2019.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import chex
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from linfjax import settings
from linfjax.settings import choice, number, spec

# Median absolute deviation to standard deviation, for normally distributed values.
MAD_CONSISTENCY = 1.4826
# Fewer classes than this that succeeded give no median worth testing against.
MIN_CLASSES = 3


def anomaly_index(norms: ArrayLike, valid: ArrayLike | None = None) -> jnp.ndarray:
  """`|n_c - median(n)| / (1.4826 * MAD(n))` over the `valid` classes; NaN for the others.

  Args:
    norms: [K] values (mask norms, or their logarithms).
    valid: optional [K] bool, the classes that enter the median and the MAD.

  Returns:
    [K] float32. Where the MAD is 0, a value off the median scores inf and one on it 0.
  """
  norms = jnp.asarray(norms, jnp.float32)
  chex.assert_rank(norms, 1)
  valid = jnp.ones(norms.shape, bool) if valid is None else jnp.asarray(valid, bool)
  kept = jnp.where(valid, norms, jnp.nan)
  median = jnp.nanmedian(kept)
  deviation = jnp.abs(kept - median)
  mad = MAD_CONSISTENCY * jnp.nanmedian(deviation)
  safe_mad = jnp.where(mad > 0, mad, 1.0)
  return jnp.where(mad > 0, deviation / safe_mad, jnp.where(deviation > 0, jnp.inf, 0.0))


def median_ratio(norms: ArrayLike, valid: ArrayLike | None = None) -> np.ndarray:
  """`median(n) / n_c` over the `valid` classes: how many times smaller than the median each
  norm is; NaN for the other classes. [K] float64."""
  norms = np.asarray(norms, np.float64)
  valid = np.ones(norms.shape, bool) if valid is None else np.asarray(valid, bool)
  ratio = np.median(norms[valid]) / np.maximum(norms, np.finfo(np.float64).tiny)
  return np.where(valid, ratio, np.nan)


@dataclasses.dataclass(frozen=True)
class Statistic:
  """An outlier index over mask norms and the threshold a class must exceed by default."""
  index: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (norms [K], valid [K]) -> [K]
  default_threshold: float
  description: str  # What the index measures, for reports.


STATISTICS: dict[str, Statistic] = {
    # Neural Cleanse's anomaly index and its threshold.
    "nc": Statistic(lambda norms, valid: np.asarray(anomaly_index(norms, valid), np.float64),
                    2.0, "Neural Cleanse's anomaly index: MADs below the median mask norm"),
    # The same index on log norms (ours): scale-free, still divided by the MAD.
    "log": Statistic(lambda norms, valid: np.asarray(anomaly_index(
        np.log(np.maximum(norms, 1e-12)), valid), np.float64), 2.0,
        "Neural Cleanse's anomaly index on the logarithms of the mask norms"),
    # The effect size (ours): a flagged mask is over 3 times smaller than the median.
    "ratio": Statistic(median_ratio, 3.0,
                       "how many times smaller than the median mask norm the class's is"),
}


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The `reverse` block's detection fields: which index flags a class, above what."""
  statistic: str = spec("ratio", choice(*STATISTICS),
                        'The outlier index: NC\'s MAD index ("nc"), the same on log norms '
                        '("log"), or median norm / class norm ("ratio", ours).')
  anomaly_threshold: float = spec(0.0, number(0.0, 100.0),
                                  "The index above which a class is flagged; 0: the "
                                  "statistic's own default.")

  @property
  def threshold(self) -> float:
    """The threshold in force: the configured one, else the statistic's default."""
    return threshold(self.statistic, self.anomaly_threshold)


def threshold(statistic: str, configured: float = 0.0) -> float:
  """The threshold a statistic flags above: `configured`, or its default when that is 0."""
  return configured or STATISTICS[statistic].default_threshold


@dataclasses.dataclass(frozen=True)
class Detection:
  """One model's verdict.

  index: [K] the anomaly index under `statistic` (NaN for classes that never succeeded);
  nc_index: [K] Neural Cleanse's own index on the same classes;
  flagged: the flagged class, or None; suspect: the class whose trigger the defense uses
  (the flagged one, else the smallest norm that succeeded; None if no class succeeded).
  """
  statistic: str
  index: np.ndarray
  nc_index: np.ndarray
  flagged: int | None
  suspect: int | None


def detect(norms: ArrayLike, succeeded: ArrayLike, *, statistic: str = "nc",
           threshold: float | None = None) -> Detection:
  """Flags the class whose mask norm is an outlier below the median, and names the suspect.

  Args:
    norms: [K] mask l1 norms, positive.
    succeeded: [K] bool, the classes whose reverse engineering reached the attack-success
      threshold; only they enter the statistics and can be flagged or suspected.
    statistic: a STATISTICS name.
    threshold: the index a class must exceed to be flagged; None: the statistic's default.
  """
  if statistic not in STATISTICS:
    raise ValueError(f"unknown statistic {statistic!r}; known: {', '.join(STATISTICS)}")
  chosen = STATISTICS[statistic]
  threshold = chosen.default_threshold if threshold is None else threshold
  norms = np.asarray(norms, np.float64)
  succeeded = np.asarray(succeeded, bool)
  nc_index = STATISTICS["nc"].index(norms, succeeded)
  index = chosen.index(norms, succeeded)
  suspect = None
  if succeeded.any():
    suspect = int(np.flatnonzero(succeeded)[np.argmin(norms[succeeded])])
  if succeeded.sum() >= MIN_CLASSES:
    below = succeeded & (norms < np.median(norms[succeeded]))
  else:
    below = np.zeros_like(succeeded)
  candidates = np.flatnonzero(below & (np.nan_to_num(index, nan=0.0) > threshold))
  flagged = int(candidates[np.argmin(norms[candidates])]) if len(candidates) else None
  return Detection(statistic, index, nc_index, flagged, flagged if flagged is not None else suspect)
