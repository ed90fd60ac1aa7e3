"""Protocols: BackdoorBench's choices as one preset (a variant or a grid axis), checked, listed,
and run; S drawn from the training images as BackdoorBench gives its defenses."""

import csv
import importlib

import numpy as np
import pytest
from test_pipeline import tiny_config

from linfjax import config as config_lib
from linfjax import data
from linfjax.runs import grid, pipeline

listing = importlib.import_module("linfjax.config.__main__")


def test_the_backdoorbench_protocol_sets_its_fields_and_the_default_sets_none():
  config = config_lib.apply_variant(config_lib.base_config(), "quick,backdoorbench")
  assert config.protocol == "backdoorbench" and config.model.name == "cnn"
  for field, value in config_lib.PROTOCOLS["backdoorbench"].items():
    node = config
    for part in field.split("."):
      node = node[part]
    assert node == value, field
  config_lib.validate(config)
  assert config_lib.PROTOCOLS["linfjax"] == {}
  assert config_lib.base_config().protocol == "linfjax"


def test_a_field_overridden_against_its_protocol_is_one_error():
  config = config_lib.apply_variant(config_lib.base_config(), "quick,backdoorbench")
  config.prune.anp.learning_rate = 0.2
  with pytest.raises(config_lib.ConfigError,
                     match=r"config\.protocol: 'backdoorbench' sets prune\.anp\.learning_rate="
                           r"0\.01 but the config has 0\.2"):
    config_lib.validate(config)
  with pytest.raises(config_lib.ConfigError, match=r"unknown config variant 'bb'; known: "
                                                   r".*'backdoorbench'"):
    config_lib.apply_variant(config_lib.base_config(), "quick,bb")


def test_a_grid_axis_over_protocols():
  config = config_lib.make_quick(config_lib.base_config())
  config.sweep.axes = "protocol=linfjax,backdoorbench"
  runs = grid.expand(config)
  assert [run.config.protocol for run in runs] == ["linfjax", "backdoorbench"]
  assert [run.config.poison.stamp for run in runs] == ["after_augmentation",
                                                       "before_augmentation"]


def test_both_protocols_are_listed():
  text = listing.registries()
  assert "Protocols (protocol;" in text and "poison.stamp='before_augmentation'" in text


def test_s_from_the_training_images_stays_in_training():
  split = data.clean_set_from_training(100, 5, seed=1)
  assert len(split.clean_set_indices) == 5 and len(set(split.clean_set_indices)) == 5
  np.testing.assert_array_equal(split.train_indices, np.arange(100))
  again = data.clean_set_from_training(100, 5, seed=1)
  np.testing.assert_array_equal(again.clean_set_indices, split.clean_set_indices)
  assert not np.array_equal(data.clean_set_from_training(100, 5, seed=2).clean_set_indices,
                            split.clean_set_indices)


def test_a_run_under_the_backdoorbench_protocol(cifar_dir, tmp_path):
  config = config_lib.apply_protocol(tiny_config(cifar_dir), "backdoorbench")
  config.data.clean_set_fraction = 0.25  # Of the 100 tiny training images: 25, seen in training.
  config.protocol = "linfjax"  # The tiny run changes a protocol field, so it is ours.
  config.stages = ("train",)
  results = pipeline.run(config, str(tmp_path / "run"), progress=False)
  assert results["train"]["clean_set"] == 25
  # 20 % of all 100 training images are poisoned: S is not taken out of training.
  assert results["train"]["poisoned"] == 20
  split = np.load(tmp_path / "run" / "train" / "split.npz")
  assert set(split["clean_set_indices"]) <= set(split["train_indices"])


def test_fine_pruning_beside_linf_writes_each_curve_on_its_own_levels(cifar_dir, tmp_path):
  """Under the backdoorbench protocol Fine-Pruning sweeps its own grid (steps of
  once_prune_ratio, not layer L's levels), and the prune stage writes and plots both curves,
  each on its own levels."""
  config = config_lib.apply_protocol(tiny_config(cifar_dir), "backdoorbench")
  config.data.clean_set_fraction = 0.25
  config.protocol = "linfjax"
  config.prune.defenses = ("linf", "fine_pruning")
  config.prune.real_defenses = ("linf",)
  config.prune.levels = (0.0, 0.25, 0.5)  # linf's 3 levels; Fine-Pruning's grid has more.
  workdir = tmp_path / "run"
  results = pipeline.run(config, str(workdir), progress=False)
  assert set(results["prune"]["synthetic"]) == {"linf", "fine_pruning"}
  with open(workdir / "prune" / "sweep_synthetic.csv") as f:
    rows = list(csv.DictReader(f))
  levels = {name: sum(row["method"] == name for row in rows) for name in ("linf", "fine_pruning")}
  assert levels["fine_pruning"] > 0 and levels["linf"] > 0
  assert levels["fine_pruning"] != levels["linf"]
  assert (workdir / "prune" / "curves_synthetic.png").stat().st_size > 0
