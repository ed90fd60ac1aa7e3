"""Trigger recovery: the mask's share inside the real trigger's region and the IoU of its top
pixels, against hand-computed values; and in a run's results.json for patch triggers only."""

import numpy as np
import pytest
from test_pipeline import tiny_config

from linfjax.runs import pipeline
from linfjax.detection import recovery


def _region(height=6, width=6, rows=slice(4, 6), cols=slice(4, 6)):
  region = np.zeros((height, width), bool)
  region[rows, cols] = True
  return region


def test_a_mask_on_the_patch_recovers_it_fully():
  region = _region()
  assert recovery.recovery(region.astype(float), region) == {"share": 1.0, "iou": 1.0}


def test_hand_computed_share_and_iou():
  region = _region()  # 4 pixels: (4,4) (4,5) (5,4) (5,5)
  mask = np.zeros((6, 6))
  mask[5, 5] = 0.5  # inside
  mask[0, 0] = 1.0  # outside, the largest
  mask[0, 1] = 0.9
  mask[4, 4] = 0.1  # inside, fourth largest
  mask[2, 2] = 0.05  # outside, fifth
  result = recovery.recovery(mask, region)
  assert result["share"] == pytest.approx((0.5 + 0.1) / 2.55)
  # Top 4: (0,0) (0,1) (5,5) (4,4): 2 inside; union 4 + 4 - 2 = 6.
  assert result["iou"] == pytest.approx(2 / 6)
  # A [H, W, 1] mask, as a Trigger holds it, gives the same.
  assert recovery.recovery(mask[..., None], region) == result


def test_ties_are_broken_by_pixel_order_and_an_empty_mask_shares_nothing():
  region = _region()
  flat = np.ones((6, 6))  # Every pixel ties: the first four in row-major order are chosen.
  assert recovery.recovery(flat, region) == {"share": pytest.approx(4 / 36), "iou": 0.0}
  assert recovery.recovery(np.zeros((6, 6)), region)["share"] == 0.0


def test_a_region_that_is_empty_or_the_whole_image_has_no_recovery():
  assert not recovery.has_region(np.ones((4, 4), bool))
  assert not recovery.has_region(np.zeros((4, 4), bool))
  assert recovery.has_region(_region())
  with pytest.raises(ValueError, match="neither empty nor the whole image"):
    recovery.recovery(np.ones((4, 4)), np.ones((4, 4), bool))


@pytest.mark.parametrize("kind", ["patch", "blend"])
def test_a_run_reports_recovery_for_a_patch_and_not_for_a_blend(cifar_dir, tmp_path, kind):
  config = tiny_config(cifar_dir)
  config.stages = ("train", "reverse")
  config.trigger.kind = kind
  if kind == "blend":
    config.trigger.pattern = "noise"
  results = pipeline.run(config, str(tmp_path / kind), progress=False)
  entry = results["reverse"]
  if kind == "blend":
    assert "recovery" not in entry
    return
  recovered = entry["recovery"]
  assert recovered["region_pixels"] == 9
  assert recovered["suspect"]["class"] == entry["suspect"]
  assert recovered["target"]["class"] == config.poison.target
  masks = np.load(tmp_path / kind / "reverse" / "backdoored" / "triggers.npz")["masks"]
  region = np.zeros((32, 32), bool)
  region[29:, 29:] = True
  expected = recovery.recovery(masks[config.poison.target], region)
  assert recovered["target"]["share"] == pytest.approx(expected["share"])
  assert recovered["target"]["iou"] == pytest.approx(expected["iou"])
  assert "recovery" not in entry["vanilla"]

