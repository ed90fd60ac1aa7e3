"""The analysis stage end to end on tiny data: results contract, files, resume and skip."""

import csv
import json
import os

import numpy as np
import pytest

from linfjax import files
from linfjax.detection import norms
from linfjax.runs import pipeline
from linfjax.runs.stages import analysis
from linfjax.runs.stages import reverse as reverse_stage
from test_pipeline import tiny_config

SUMMARY_KEYS = {"z", "top1_share", "rel"}


def _check_entry(entry, layers, conditions):
  assert set(entry) == {"backdoored", "vanilla", "attention"}
  for kind in ("backdoored", "vanilla"):
    assert set(entry[kind]) == set(layers)
    for layer in layers:
      assert set(entry[kind][layer]) == set(norms.NORMS)
      for summary in entry[kind][layer].values():
        assert set(summary) == SUMMARY_KEYS
        assert all(np.isfinite(v) for v in summary.values())
        assert summary["z"] >= 0.0 and 0.0 <= summary["top1_share"] <= 1.0
    assert set(entry["attention"][kind]) == {"clean", *conditions}
    assert all(0.0 <= v <= 1.0 for v in entry["attention"][kind].values())


def test_analysis_stage_results_files_resume_and_skip(cifar_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  config = tiny_config(cifar_dir)
  config.stages = ("train", "analysis")
  config.model.probe_layers = ("conv2_2", "conv3_2")
  results = pipeline.run(config, workdir, progress=False)
  entry = results["analysis"]
  _check_entry(entry, ["conv2_2", "conv3_2"], ["real"])
  stage_dir = os.path.join(workdir, "analysis")
  for name in ("gradcam.png", "shifts_real_conv3_2.png", "shifts_real_conv2_2.png",
               "top_neurons_backdoored_conv3_2.png", "top_neurons_vanilla_conv2_2.png"):
    with open(os.path.join(stage_dir, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  with open(os.path.join(stage_dir, "analysis.json")) as f:
    report = json.load(f)
  assert report["summaries"]["backdoored"]["real"] == entry["backdoored"]
  # conv3_2 of the width-0.125 CNN has 16 neurons; the CSV holds one row per neuron.
  assert len(report["shifts"]["vanilla"]["real"]["conv3_2"]["linf"]) == 16
  with open(os.path.join(stage_dir, "shifts.csv")) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2 * 3 * (8 + 16)
  row = next(r for r in rows if r["model"] == "backdoored" and r["layer"] == "conv3_2"
             and r["norm"] == "linf" and r["neuron"] == "5")
  delta = float(row["delta"])
  assert delta == pytest.approx(float(row["triggered_mean"]) - float(row["clean_mean"]))
  assert delta == pytest.approx(report["shifts"]["backdoored"]["real"]["conv3_2"]["linf"][5])
  # The summaries, recomputed with NumPy from the stage's own saved moments (docs/method.md).
  for kind in ("backdoored", "vanilla"):
    with np.load(os.path.join(stage_dir, f"{kind}.npz")) as saved:
      mean = saved["moments/conv3_2/mean"]
    for n, norm in enumerate(norms.NORMS):
      clean, delta = mean[0, n], mean[1, n] - mean[0, n]
      positive = np.maximum(delta, 0.0)
      top = np.sort(positive)[::-1][:max(1, len(delta) // 100)].sum()
      expected = {"z": (delta.max() - delta.mean()) / delta.std(),
                  "top1_share": top / positive.sum() if positive.sum() > 0 else 0.0,
                  "rel": delta.max() / max(clean[np.argmax(delta)], 0.01 * clean.mean())}
      assert entry[kind]["conv3_2"][norm] == pytest.approx(expected, rel=1e-4, abs=1e-6), norm

  # Skip: a finished stage does not run again.
  monkeypatch.setitem(pipeline.STAGES, "analysis", lambda ctx: pytest.fail("analysis reran"))
  assert pipeline.run(config, workdir, progress=False) == results
  monkeypatch.setitem(pipeline.STAGES, "analysis", analysis.run)

  # Resume: with its results entry gone (as after a kill), the finished models are reloaded.
  def _drop_analysis():
    with open(os.path.join(workdir, "results.json")) as f:
      on_disk = json.load(f)
    del on_disk["analysis"]
    files.write_json(os.path.join(workdir, "results.json"), on_disk)

  _drop_analysis()
  monkeypatch.setattr(norms, "norm_statistics",
                      lambda *args, **kwargs: pytest.fail("finished model recomputed"))
  assert pipeline.run(config, workdir, progress=False)["analysis"] == entry

  # A synthetic trigger from the reverse stage changes the inputs: both models recompute.
  monkeypatch.undo()
  os.makedirs(os.path.join(workdir, "reverse"))
  mask = np.zeros((32, 32, 1), np.float32)
  mask[:4, :4] = 0.9
  mask[4:, 4:] = 0.01
  pattern = np.full((32, 32, 3), 0.5, np.float32)
  np.savez(reverse_stage.synthetic_trigger_path(workdir), mask=mask, pattern=pattern, target=0,
           flagged=True)
  _drop_analysis()
  with_synthetic = pipeline.run(config, workdir, progress=False)["analysis"]
  _check_entry(with_synthetic, ["conv2_2", "conv3_2"], ["real", "synthetic"])
  for layer in ("conv2_2", "conv3_2"):
    for norm in norms.NORMS:
      assert with_synthetic["backdoored"][layer][norm] == pytest.approx(
          entry["backdoored"][layer][norm], rel=1e-5)
  assert with_synthetic["attention"]["vanilla"]["real"] == pytest.approx(
      entry["attention"]["vanilla"]["real"])
  assert os.path.exists(os.path.join(stage_dir, "shifts_synthetic_conv3_2.png"))
  trigger, _, _ = reverse_stage.load_synthetic_trigger(workdir, (32, 32, 3), 10)
  region = analysis.synthetic_region(trigger)
  assert region.sum() == 16 and region[:4, :4].all()


def test_synthetic_trigger_of_wrong_shape_is_refused(tmp_path):
  os.makedirs(tmp_path / "reverse")
  np.savez(tmp_path / "reverse" / "synthetic_trigger.npz", mask=np.zeros((32, 32)),
           pattern=np.zeros((32, 32, 3)), target=0, flagged=True)
  with pytest.raises(ValueError, match=r"mask \(32, 32\)"):
    reverse_stage.load_synthetic_trigger(str(tmp_path), (32, 32, 3), 10)
  np.savez(tmp_path / "reverse" / "synthetic_trigger.npz", mask=np.zeros((32, 32, 1)),
           pattern=np.zeros((32, 32, 3)), flagged=False)
  with pytest.raises(ValueError, match=r"lacks arrays \['target'\]"):
    reverse_stage.load_synthetic_trigger(str(tmp_path), (32, 32, 3), 10)
  np.savez(tmp_path / "reverse" / "synthetic_trigger.npz", mask=np.zeros((32, 32, 1)),
           pattern=np.zeros((32, 32, 3)), flagged=False, target=-1)
  with pytest.raises(ValueError, match=r"target -1 is not a class"):
    reverse_stage.load_synthetic_trigger(str(tmp_path), (32, 32, 3), 10)
  assert reverse_stage.load_synthetic_trigger(str(tmp_path / "absent"), (32, 32, 3), 10) is None
