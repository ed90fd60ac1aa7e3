"""Neural Cleanse as a detector: scores, rates, AUROC and the held-out threshold, by hand."""

import json

import numpy as np
import pytest

from linfjax.detection import rates
from linfjax.reports import detection_rates


def _model(smallest, target=None, classes=10, others=10.0, at=0):
  norms = np.full(classes, others)
  norms[at] = smallest
  norms[1] = others * 1.1  # Not all equal, so the MAD is not zero.
  return rates.Model(norms, np.ones(classes, bool), target)


def test_score_is_the_largest_index_below_the_median_and_its_class():
  value, flagged = rates.score(_model(2.0, at=3), "ratio")
  assert flagged == 3 and value == pytest.approx(10.0 / 2.0)
  # Nothing below the median: no class can be flagged.
  flat = rates.Model(np.full(10, 5.0), np.ones(10, bool), 0)
  assert rates.score(flat, "ratio") == (0.0, None)
  # Classes that never succeeded are left out.
  failed = rates.Model(np.array([1.0, 10, 10, 10]), np.array([False, True, True, True]), 0)
  assert rates.score(failed, "ratio") == (0.0, None)


def test_rates_count_targets_wrong_classes_and_vanilla_models():
  models = [_model(1.0, target=0), _model(2.5, target=0), _model(1.0, target=0, at=4),
            _model(8.0), _model(4.0)]
  counted = rates.rates(models, "ratio", 3.0)
  # Scores: 10, 4, 10 (class 4) for backdoored; 1.25 and 2.5 for vanilla.
  assert (counted.target_flagged, counted.wrong_flagged, counted.backdoored) == (2, 1, 3)
  assert (counted.vanilla_flagged, counted.vanilla) == (0, 2)
  assert counted.auroc == 1.0
  assert rates.rates(models, "ratio", 2.0).vanilla_flagged == 1


def test_auroc_by_hand():
  assert rates.auroc([3, 1], [2, 0]) == pytest.approx(3 / 4)
  assert rates.auroc([1], [1]) == 0.5
  assert rates.auroc([], [1]) is None


def test_the_threshold_is_chosen_on_calibration_models_only():
  calibration = [_model(1.0, target=0), _model(2.0, target=0), _model(6.0), _model(3.0)]
  # Scores: backdoored 10, 5; vanilla 1.67, 3.33: the best separations are between 3.33
  # and 5 (J = 1); the largest such midpoint is (3.33 + 5) / 2.
  threshold = rates.choose_threshold(calibration, "ratio")
  assert threshold == pytest.approx((10 / 3 + 5) / 2)
  held_out = [_model(4.0, target=0), _model(2.2)]  # Scores 2.5 and 4.55: both sides of it.
  counted = rates.rates(held_out, "ratio", threshold)
  assert (counted.target_flagged, counted.vanilla_flagged) == (0, 1)


def _run(path, mask_l1, vanilla_l1, target=0, reverse=True):
  path.mkdir(parents=True)
  results = {"seed": 0}
  if reverse:
    results["reverse"] = {"mask_l1": list(mask_l1), "succeeded": [True] * len(mask_l1),
                          "vanilla": {"mask_l1": list(vanilla_l1),
                                      "succeeded": [True] * len(vanilla_l1)}}
  (path / "results.json").write_text(json.dumps(results))
  (path / "config.json").write_text(json.dumps({"poison": {"target": target,
                                                           "mode": "all_to_one"}}))
  return str(path)


def test_the_command_prints_every_statistic_and_writes_json(tmp_path, capsys):
  backdoored = [1.0, 11.0] + [10.0] * 8
  vanilla = [7.0, 11.0] + [10.0] * 8
  runs = [_run(tmp_path / f"r{i}", backdoored, vanilla) for i in range(3)]
  out = tmp_path / "rates.json"
  assert detection_rates.main(["x", "--calibration", *runs[:2], "--held_out", "other", runs[2],
                               "--json", str(out)]) == 0
  text = capsys.readouterr().out
  for statistic in ("nc", "log", "ratio"):
    assert f"| {statistic} |" in text
  numbers = json.loads(out.read_text())
  assert numbers["ratio"]["sets"]["other"]["chosen"]["target_flagged"] == 1
  assert numbers["ratio"]["sets"]["calibration"]["chosen"]["backdoored"] == 2


def test_a_run_without_the_reverse_stage_is_one_error_line(tmp_path, capsys):
  run = _run(tmp_path / "r", [], [], reverse=False)
  assert detection_rates.main(["x", "--calibration", run]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "has no reverse stage" in err
