"""Protocols: BackdoorBench's choices as one preset (a variant or a grid axis), checked, listed,
and run; S drawn from the training images as BackdoorBench gives its defenses."""

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
