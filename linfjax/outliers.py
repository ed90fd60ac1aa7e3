"""Which class's reverse-engineered trigger is an outlier: the anomaly index and the suspect.

Neural Cleanse's anomaly index of class `c` is `|n_c - median(n)| / (1.4826 * MAD(n))` over
the classes' mask norms `n` (METHOD.md, "Synthetic trigger"); only classes below the median
can be flagged, and the flagged target is the one of smallest norm among those whose index
exceeds the threshold (2). Two choices here are ours:
  - a class whose reverse engineering never reached the attack-success threshold has no
    trigger, only an unregularised mask: it is left out of the median and the MAD and can be
    neither flagged nor suspected;
  - `STATISTICS` names the scale the index is computed on: "nc" the norms themselves
    (Neural Cleanse), "log" their logarithms, which treats a mask 3x smaller than the
    median the same whatever the median (README, "Defaults we chose", has the measurements
    behind the default).
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

# Median absolute deviation to standard deviation, for normally distributed values.
MAD_CONSISTENCY = 1.4826
# The scale each statistic measures the norms on.
STATISTICS: dict[str, Callable[[ArrayLike], ArrayLike]] = {
    "nc": lambda norms: norms,
    "log": jnp.log,
}
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
           threshold: float = 2.0) -> Detection:
  """Flags the class whose mask norm is an outlier below the median, and names the suspect.

  Args:
    norms: [K] mask l1 norms, positive.
    succeeded: [K] bool, the classes whose reverse engineering reached the attack-success
      threshold; only they enter the statistics and can be flagged or suspected.
    statistic: a STATISTICS name.
    threshold: the index a class must exceed to be flagged.
  """
  if statistic not in STATISTICS:
    raise ValueError(f"unknown statistic {statistic!r}; known: {', '.join(STATISTICS)}")
  norms = np.asarray(norms, np.float64)
  succeeded = np.asarray(succeeded, bool)
  enough = succeeded.sum() >= MIN_CLASSES
  nc_index = np.asarray(anomaly_index(norms, succeeded), np.float64)
  index = np.asarray(anomaly_index(STATISTICS[statistic](np.maximum(norms, 1e-12)), succeeded),
                     np.float64)
  suspect = None
  if succeeded.any():
    suspect = int(np.flatnonzero(succeeded)[np.argmin(norms[succeeded])])
  below = succeeded & (norms < np.median(norms[succeeded])) if enough else np.zeros_like(succeeded)
  candidates = np.flatnonzero(below & (np.nan_to_num(index, nan=0.0) > threshold))
  flagged = int(candidates[np.argmin(norms[candidates])]) if len(candidates) else None
  return Detection(statistic, index, nc_index, flagged, flagged if flagged is not None else suspect)
