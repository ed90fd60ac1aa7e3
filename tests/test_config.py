import importlib.util
import os
import subprocess
import sys

import pytest

from linfjax import config as config_lib
from conftest import REPO_ROOT


def _quick():
  return config_lib.make_quick(config_lib.base_config())


def test_defaults_and_quick_validate():
  config_lib.validate(config_lib.base_config())
  config_lib.validate(_quick())


@pytest.mark.parametrize("field,value,message", [
    ("model.name", "resnet50", "config.model.name: unknown value 'resnet50'; known: cnn, "
                               "preact_resnet18, vgg11"),
    ("trigger.kind", "lira", "config.trigger.kind: unknown value 'lira'; known: patch, blend, "
                             "sig, wanet"),
    ("data.source", "imagenet_dir", "config.data.source: unknown value"),
    ("poison.rate", 0.0, r"config.poison.rate: 0.0 is outside \(0.0, 1.0\)"),
    ("poison.rate", 1.0, r"config.poison.rate: 1.0 is outside"),
    ("poison.mode", "one_to_one", "config.poison.mode"),
    ("train.epochs", 0, "config.train.epochs: must be an integer >= 1"),
    ("train.batch_size", -4, "config.train.batch_size"),
    ("train.learning_rate", 0.0, "config.train.learning_rate"),
    ("trigger.pattern", "noise", "config.trigger.pattern: unknown value 'noise'; known: solid"),
    ("trigger.color", (1.0, 2.0, 1.0), "config.trigger.color"),
    ("stages", ("train", "dance"), "config.stages: unknown stage 'dance'"),
    ("train.compute_dtype", "float16", "config.train.compute_dtype"),
])
def test_validation_names_the_field(field, value, message):
  config = _quick()
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_blend_alpha_range():
  config = _quick()
  config.trigger.kind, config.trigger.pattern, config.trigger.alpha = "blend", "noise", 1.5
  with pytest.raises(config_lib.ConfigError, match="config.trigger.alpha"):
    config_lib.validate(config)


def test_data_dependent_checks():
  config = _quick()
  config.poison.target = 10
  with pytest.raises(config_lib.ConfigError, match="config.poison.target: 10 is not a class"):
    config_lib.validate_against_data(config, image_shape=(32, 32, 3), num_classes=10,
                                     num_train=5000)
  config = _quick()
  config.trigger.position, config.trigger.offset = "offset", (0, 30)
  with pytest.raises(config_lib.ConfigError, match="does not fit a 32x32 image"):
    config_lib.validate_against_data(config, image_shape=(32, 32, 3), num_classes=10,
                                     num_train=5000)
  config = _quick()
  config.data.clean_set_size = 5000
  with pytest.raises(config_lib.ConfigError, match="config.data.clean_set_size"):
    config_lib.validate_against_data(config, image_shape=(32, 32, 3), num_classes=10,
                                     num_train=5000)


def _load_config_file(path, *args):
  spec = importlib.util.spec_from_file_location("config_file", os.path.join(REPO_ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


@pytest.mark.parametrize("path", ["configs/cifar_patch.py", "configs/cifar_blend.py",
                                  "configs/cifar_sig.py", "configs/cifar_wanet.py"])
def test_config_files_load_and_validate(path):
  full = _load_config_file(path)
  quick = _load_config_file(path, "quick")
  config_lib.validate(full)
  config_lib.validate(quick)
  assert full.model.name == "preact_resnet18" and full.data.source == "tfds"
  assert (full.train.epochs, full.train.batch_size, full.train.learning_rate) == (100, 128, 0.01)
  assert quick.model.name == "cnn" and quick.data.source == "cifar10_dir"
  with pytest.raises(config_lib.ConfigError, match="unknown config variant 'fast'"):
    _load_config_file(path, "fast")


def _main(*args):
  return subprocess.run([sys.executable, "-m", "linfjax.main", *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120)


def test_command_line_rejects_bad_values_before_compute(tmp_path):
  workdir = str(tmp_path / "run")
  result = _main("--config=configs/cifar_patch.py:quick", "--config.model.name=resnet50",
                 f"--workdir={workdir}")
  assert result.returncode != 0
  assert "config.model.name: unknown value 'resnet50'" in result.stderr
  assert not os.path.exists(workdir)
  typo = _main("--config=configs/cifar_patch.py:quick", "--config.train.epoch=3",
               f"--workdir={workdir}")
  assert typo.returncode != 0 and "epoch" in typo.stderr


def test_attack_configs_and_their_poisoning():
  sig = _load_config_file("configs/cifar_sig.py", "quick")
  assert (sig.trigger.kind, sig.trigger.clean_label, sig.trigger.cross_ratio) == ("sig", True, 0.0)
  assert sig.trigger.amplitude == 40 / 255 and sig.trigger.frequency == 6.0
  assert sig.poison.rate == 0.08 and _load_config_file("configs/cifar_sig.py").poison.rate == 0.09
  wanet = _load_config_file("configs/cifar_wanet.py", "quick")
  assert (wanet.trigger.kind, wanet.trigger.grid_size, wanet.trigger.strength) == ("wanet", 4, 0.5)
  assert (wanet.trigger.clean_label, wanet.trigger.cross_ratio) == (False, 2.0)


def test_clean_label_needs_all_to_one_and_noise_mode_needs_wanet():
  config = _quick()
  config.trigger.update(config_lib.TRIGGER_PRESETS["sig"])
  config.poison.mode = "all_to_all"
  with pytest.raises(config_lib.ConfigError, match="config.trigger.clean_label: .*all_to_one"):
    config_lib.validate(config)
  config.trigger.clean_label = False
  config_lib.validate(config)
  config.trigger.cross_ratio = 2.0
  with pytest.raises(config_lib.ConfigError, match=r"config.trigger.cross_ratio: 2.0: the 'sig' "
                     r"trigger has no noise mode \(only wanet, inputaware have one\)"):
    config_lib.validate(config)
  config = _quick()
  config.trigger.update(config_lib.TRIGGER_PRESETS["wanet"])
  config.trigger.grid_size = 1
  with pytest.raises(config_lib.ConfigError, match="config.trigger.grid_size: must be an integer >= 2"):
    config_lib.validate(config)
  config.trigger.grid_size = 40
  with pytest.raises(config_lib.ConfigError, match="grid_size: 40 is larger than the 32x32"):
    config_lib.validate_against_data(config, image_shape=(32, 32, 3), num_classes=10,
                                     num_train=5000)


def test_trigger_presets_set_every_attack_field_on_a_grid_axis():
  from linfjax.runs import grid
  config = _load_config_file("configs/cifar_wanet.py", "quick")
  config.sweep.axes = "trigger=patch,blend,sig,wanet"
  runs = {run.values["trigger"]: run.config.trigger for run in grid.expand(config)}
  assert {kind: (t.kind, t.clean_label, t.cross_ratio) for kind, t in runs.items()} == {
      "patch": ("patch", False, 0.0), "blend": ("blend", False, 0.0),
      "sig": ("sig", True, 0.0), "wanet": ("wanet", False, 2.0)}


def test_data_source_fields():
  config = _quick()
  config.data.source = "image_folder"
  config.data.path = ""
  with pytest.raises(config_lib.ConfigError, match="config.data.path: is empty; source='image_folder'"):
    config_lib.validate(config)
  config.data.path = "/data/gtsrb"
  config.data.image_size = (32, 0)
  with pytest.raises(config_lib.ConfigError, match=r"config.data.image_size: must be \(\) or"):
    config_lib.validate(config)
  config.data.image_size = (32, 32)
  config_lib.validate(config)
  config.data.source = "cifar10_dir"
  with pytest.raises(config_lib.ConfigError, match="cifar10_dir images are 32x32"):
    config_lib.validate(config)
  config = _quick()
  config.data.test_split = ""
  with pytest.raises(config_lib.ConfigError, match="config.data.test_split: must be a non-empty"):
    config_lib.validate(config)


@pytest.mark.parametrize("name, model", [("gtsrb_alexnet", "alexnet"), ("gtsrb_patch", "cnn")])
def test_gtsrb_configs_read_gtsrb_as_it_ships(name, model):
  config = _load_config_file(f"configs/{name}.py")
  assert (config.data.source, tuple(config.data.image_size), config.data.clean_set_size) == (
      "gtsrb", (32, 32), 1290)
  assert (config.train.epochs, config.train.flip, config.trigger.kind) == (50, False, "patch")
  with pytest.raises(config_lib.ConfigError, match="config.data.path: is empty"):
    config_lib.validate(config)
  config.data.path = "/data/gtsrb"
  config_lib.validate(config)
  quick = _load_config_file(f"configs/{name}.py", "quick")
  config_lib.validate(quick)
  assert quick.model.name == model and quick.data.path == config_lib.SHARED_GTSRB
  assert set(quick.prune.defenses) >= {"linf", "l2", "l1", "fine_pruning", "anp", "clp",
                                       "nc_unlearning"}
  assert _load_config_file("configs/grid_gtsrb.py").sweep.axes == "seed=0,1,2,3,4,5"


def test_only_the_patch_uses_the_colour_on_grey_images():
  config = _quick()
  with pytest.raises(config_lib.ConfigError, match="trigger.color: has 3 values; the images have 1"):
    config_lib.validate_against_data(config, image_shape=(28, 28, 1), num_classes=10,
                                     num_train=5000)
  config.trigger.update(config_lib.TRIGGER_PRESETS["wanet"])
  config_lib.validate_against_data(config, image_shape=(28, 28, 1), num_classes=10,
                                   num_train=5000)
