"""python -m linfjax.reports.data_detection: the data-side detectors on a tiny finished run,
checked against the detectors called by hand on independently stamped images."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, write_cifar_dir
from test_pipeline import tiny_config

import linfjax
from linfjax.detection import activation_clustering, data_features, spectral_signatures, strip
from linfjax.reports import data_detection


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A finished train stage: 80 training images (after |S| = 20), 16 poisoned (rate 0.2)."""
  root = tmp_path_factory.mktemp("data_detection")
  cifar = str(root / "cifar")
  write_cifar_dir(cifar)
  config = tiny_config(cifar, epochs=1)
  config.stages = ("train",)
  workdir = str(root / "run")
  linfjax.run(config, workdir)
  return workdir


def _corner(images):
  """BadNets' 3x3 white bottom-right corner, stamped by hand on uint8 images."""
  out = np.asarray(images, np.float32) / 255.0
  out[:, -3:, -3:, :] = 1.0
  return out


def test_numbers_equal_the_detectors_called_by_hand(tiny_run, tmp_path, capsys):
  before = sorted(os.listdir(tiny_run))
  out = str(tmp_path / "numbers.json")
  assert data_detection.main(["prog", tiny_run, "--json", out]) == 0
  assert sorted(os.listdir(tiny_run)) == before  # Nothing written into the run.
  printed = capsys.readouterr().out
  assert printed.startswith("| run | detector | flagged | scanned | precision | recall |")
  with open(out) as f:
    numbers = json.load(f)["runs"][tiny_run]

  run = linfjax.load_run(tiny_run)
  poisoned = linfjax.poison(run.config, run.dataset, run.split, run.trigger)
  assert len(poisoned.poison_indices) == round(0.2 * 80) == 16
  saved = np.load(os.path.join(tiny_run, "train", "split.npz"))["poison_indices"]
  np.testing.assert_array_equal(poisoned.poison_indices, saved)
  # The stamp is after augmentation, so the set holds the images unstamped: stamp by hand.
  assert poisoned.stamp_after_augmentation.sum() == 16
  assert not np.all(poisoned.images[poisoned.poison_indices][:, -3:, -3:] == 255)
  images = poisoned.images.astype(np.float32) / 255.0
  images[poisoned.poison_indices] = _corner(poisoned.images[poisoned.poison_indices])
  model, variables = run.model("backdoored")
  features = data_features.penultimate_features(model, variables, images, batch_size=32)
  labels = poisoned.labels
  ss = spectral_signatures.detect(features, labels, expected_poison_fraction=0.2)
  counts = np.bincount(labels)
  assert len(ss) == sum(int(np.floor(1.5 * 0.2 * n)) for n in counts if n >= 2)
  ac = activation_clustering.detect(features, labels, dims=min(10, features.shape[1]))
  for name, flagged in (("spectral_signatures", ss), ("activation_clustering", ac)):
    precision, recall = data_features.precision_recall(flagged, poisoned.poison_indices)
    assert numbers[name] == {"flagged": len(flagged), "scanned": 80, "poisoned": 16,
                             "precision": pytest.approx(precision),
                             "recall": pytest.approx(recall)}

  test_images, test_labels = run.dataset.test_images, run.dataset.test_labels
  predict = jax.jit(lambda x: jax.nn.softmax(model.apply(variables, x)[0]))
  result = strip.detect(predict, test_images, _corner(test_images[test_labels != 0]),
                        run.clean_set[0])
  assert numbers["strip"]["scanned"] == int((test_labels != 0).sum())
  assert numbers["strip"]["FRR"] == pytest.approx(result.frr)
  assert numbers["strip"]["FAR"] == pytest.approx(result.far)
  assert numbers["strip"]["flagged"] == int(result.flagged.sum())


def test_means_over_runs_in_the_table():
  one = {"spectral_signatures": {"flagged": 3, "scanned": 10, "precision": 0.5, "recall": 1.0},
         "strip": {"flagged": 2, "scanned": 4, "FRR": 0.0, "FAR": 0.5}}
  two = {"spectral_signatures": {"flagged": 4, "scanned": 10, "precision": 0.25, "recall": 0.5},
         "strip": {"flagged": 4, "scanned": 4, "FRR": 0.5, "FAR": 0.0}}
  text = data_detection.table({"a": one, "b": two})
  assert "| mean of 2 | spectral_signatures | 3.5 | 10 | 0.375 | 0.750 | - | - |" in text
  assert "| mean of 2 | strip | 3 | 4 | - | - | 0.250 | 0.250 |" in text
  assert "| a | strip | 2 | 4 | - | - | 0.000 | 0.500 |" in text


def test_bad_runs_are_one_line_and_exit_2(tiny_run, tmp_path, capsys):
  out = tmp_path / "numbers.json"
  result = subprocess.run([sys.executable, "-m", "linfjax.reports.data_detection",
                           str(tmp_path / "nowhere"), "--json", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.count("\n") == 1 and "not a directory" in result.stderr
  # A run directory whose train stage has not finished, after a good one: refused before
  # anything is measured, and left as it was.
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  shutil.copy(os.path.join(tiny_run, "config.json"), unfinished)
  assert data_detection.main(["prog", tiny_run, str(unfinished), "--json", str(out)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "no finished train stage" in err
  assert os.listdir(unfinished) == ["config.json"] and not out.exists()
