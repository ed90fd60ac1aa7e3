"""Outlier detection on mask norms: NC's index, the log statistic, the suspect."""

import jax
import numpy as np
import pytest

from linfjax.detection import outliers


def _np_anomaly_index(values):
  median = np.median(values)
  return np.abs(values - median) / (1.4826 * np.median(np.abs(values - median)))


@pytest.mark.parametrize("norms,expected", [
    ([50, 52, 49, 51, 12, 50, 53, 48, 50, 51], 4),
    ([50, 52, 49, 51, 47.5, 50, 53, 48, 50, 51], None),  # 53's index 2.02 is above the median
    ([50, 52, 49, 51, 47.5, 50, 95, 48, 50, 51], None),  # only the large norm is an outlier
    ([50, 10, 49, 51, 12, 50, 53, 48, 50, 51], 1),  # two flagged: the smallest norm wins
])
def test_anomaly_index_against_numpy(norms, expected):
  norms = np.asarray(norms, np.float32)
  np.testing.assert_allclose(jax.jit(outliers.anomaly_index)(norms), _np_anomaly_index(norms),
                             rtol=1e-5)
  detection = outliers.detect(norms, np.ones(10, bool))
  assert detection.flagged == expected
  assert detection.suspect == int(np.argmin(norms))


def test_log_statistic_against_numpy():
  norms = np.array([8, 60, 45, 150, 170, 200, 190, 55, 70, 65], np.float64)
  detection = outliers.detect(norms, np.ones(10, bool), statistic="log")
  np.testing.assert_allclose(detection.index, _np_anomaly_index(np.log(norms)), rtol=1e-4)
  np.testing.assert_allclose(detection.nc_index, _np_anomaly_index(norms), rtol=1e-5)
  assert detection.nc_index[0] < 2 < detection.index[0]
  assert detection.flagged == 0
  assert outliers.detect(norms, np.ones(10, bool), statistic="nc").flagged is None


def test_classes_that_never_succeeded_stay_out_of_the_statistics():
  norms = np.array([50, 10, 49, 51, 12, 50, 53, 48, 50, 900], np.float32)
  succeeded = np.ones(10, bool)
  succeeded[[1, 9]] = False
  detection = outliers.detect(norms, succeeded)
  kept = norms[succeeded]
  expected = _np_anomaly_index(kept)
  np.testing.assert_allclose(detection.nc_index[succeeded], expected, rtol=1e-5)
  assert np.isnan(detection.nc_index[[1, 9]]).all()
  assert detection.flagged == detection.suspect == 4
  succeeded[4] = False
  detection = outliers.detect(norms, succeeded)
  assert detection.flagged is None and detection.suspect == 7  # 48, the smallest that succeeded


def test_suspect_without_a_flag_and_too_few_classes():
  norms = np.array([46, 52, 49, 51, 47.5, 50, 53, 48, 50, 51], np.float32)
  detection = outliers.detect(norms, np.ones(10, bool))
  assert detection.flagged is None and detection.suspect == 0
  succeeded = np.zeros(10, bool)
  succeeded[[0, 3]] = True
  detection = outliers.detect(norms, succeeded)
  assert detection.flagged is None and detection.suspect == 0
  detection = outliers.detect(norms, np.zeros(10, bool))
  assert detection.flagged is None and detection.suspect is None


def test_zero_mad():
  norms = np.array([50.0] * 9 + [10.0], np.float32)
  np.testing.assert_array_equal(outliers.anomaly_index(norms), [0.0] * 9 + [np.inf])
  assert outliers.detect(norms, np.ones(10, bool)).flagged == 9


def test_unknown_statistic():
  with pytest.raises(ValueError, match="unknown statistic 'z'; known: nc, log, ratio"):
    outliers.detect(np.ones(10), np.ones(10, bool), statistic="z")


def test_ratio_statistic_is_the_median_over_the_norm_with_its_own_threshold():
  norms = np.array([30, 60, 45, 150, 170, 200, 190, 55, 70, 65], np.float64)
  succeeded = np.ones(10, bool)
  succeeded[4] = False  # 170 leaves the median: 65 of the other nine.
  detection = outliers.detect(norms, succeeded, statistic="ratio")
  expected = np.where(succeeded, 65.0 / norms, np.nan)
  np.testing.assert_allclose(detection.index, expected)
  assert detection.flagged is None and detection.suspect == 0  # 65 / 30 = 2.17 < 3.
  norms[0] = 20.0  # 3.25 times below the median.
  assert outliers.detect(norms, succeeded, statistic="ratio").flagged == 0
  assert outliers.detect(norms, succeeded, statistic="ratio", threshold=3.5).flagged is None
  assert outliers.STATISTICS["nc"].default_threshold == 2.0
