"""Run configuration: the defaults, the quick variant, and validation.

A run is described by one `ml_collections.ConfigDict`. `base_config()` holds the
full-size defaults (BackdoorBench's recipe: PreActResNet-18, SGD lr 0.01, momentum
0.9, weight decay 5e-4, batch 128, 100 epochs, cosine decay). `make_quick` turns a
config into the laptop variant that runs on the shared CIFAR-10 subset in minutes.

`validate` checks every field that can be checked without data and raises a
`ConfigError` naming the field and the allowed values; `validate_against_data`
checks what needs the dataset (the trigger fits the image, the target is a class).
Both run before any model is built.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import ml_collections

MODEL_NAMES = ("cnn", "preact_resnet18", "vgg11")
DATA_SOURCES = ("cifar10_dir", "tfds")
TRIGGER_KINDS = ("patch", "blend")
PATCH_PATTERNS = ("solid", "checkerboard", "file")
BLEND_PATTERNS = ("noise", "file")
PATCH_POSITIONS = ("bottom_right", "bottom_left", "top_right", "top_left", "offset")
POISON_MODES = ("all_to_one", "all_to_all")
STAMP_MODES = ("after_augmentation", "before_augmentation")
COMPUTE_DTYPES = ("float32", "bfloat16")
STAGE_NAMES = ("train",)

# Where the shared CIFAR-10 subset sits relative to a checkout of the repo.
SHARED_SUBSET = "../shared/data/cifar10-subset"


class ConfigError(ValueError):
  """A config field holds a value that linfjax cannot run with."""


def base_config() -> ml_collections.ConfigDict:
  """Full-size defaults: BackdoorBench's recipe on TFDS CIFAR-10."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.stages = STAGE_NAMES

  config.data = ml_collections.ConfigDict()
  config.data.source = "tfds"
  config.data.name = "cifar10"  # TFDS dataset name (source="tfds").
  config.data.data_dir = ""  # TFDS data_dir; "" means TFDS's default.
  config.data.path = ""  # Directory of a cifar-10-batches-py layout (source="cifar10_dir").
  config.data.clean_set_size = 500  # The defender's held-out clean set S (METHOD.md).
  config.data.train_limit = 0  # Use only the first N training images; 0 means all.
  config.data.test_limit = 0  # Likewise for the test split.

  config.trigger = ml_collections.ConfigDict()
  config.trigger.kind = "patch"
  config.trigger.size = 3  # Patch side in pixels.
  config.trigger.position = "bottom_right"
  config.trigger.offset = (0, 0)  # (row, col) of the patch's top-left when position="offset".
  config.trigger.pattern = "solid"
  config.trigger.color = (1.0, 1.0, 1.0)  # Solid / checkerboard colour, in [0, 1].
  config.trigger.pattern_file = ""  # .npy (or image) pattern when pattern="file".
  config.trigger.alpha = 0.2  # Blend weight (BackdoorBench's blended default).
  config.trigger.noise_seed = 0  # Seed of the blend noise pattern.

  config.poison = ml_collections.ConfigDict()
  config.poison.rate = 0.1
  config.poison.target = 0
  config.poison.mode = "all_to_one"
  # Where the trigger is stamped on a poisoned training image. "after_augmentation"
  # keeps it at its fixed place (ours, the default: crop and flip otherwise move and
  # blur a corner patch); "before_augmentation" is how BackdoorBench stores poisoned
  # images.
  config.poison.stamp = "after_augmentation"

  config.model = ml_collections.ConfigDict()
  config.model.name = "preact_resnet18"
  config.model.width = 1.0  # Channel multiplier.
  config.model.probe_layers = ()  # Empty: the model's default (last conv map before pooling).

  config.train = ml_collections.ConfigDict()
  config.train.epochs = 100
  config.train.batch_size = 128
  config.train.learning_rate = 0.01
  config.train.momentum = 0.9
  config.train.weight_decay = 5e-4
  config.train.crop_padding = 4
  config.train.flip = True
  config.train.compute_dtype = "float32"
  config.train.eval_batch_size = 500
  return config


def make_quick(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The laptop variant: small CNN on the shared subset, a few minutes on 2 cores."""
  config.data.source = "cifar10_dir"
  config.data.path = SHARED_SUBSET
  config.model.name = "cnn"
  config.model.width = 1.0
  config.train.epochs = 10
  config.train.learning_rate = 0.05
  return config


VARIANTS = {"": lambda config: config, "quick": make_quick}


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Applies a config file's argument (`--config=FILE:quick`); an unknown one lists the known."""
  if variant not in VARIANTS:
    raise ConfigError(f"unknown config variant {variant!r}; known: "
                      f"{', '.join(repr(v) for v in VARIANTS)}")
  return VARIANTS[variant](config)


def _fail(field: str, message: str) -> None:
  raise ConfigError(f"config.{field}: {message}")


def _check_choice(config, field: str, allowed: Sequence[str]) -> None:
  value = _get(config, field)
  if value not in allowed:
    _fail(field, f"unknown value {value!r}; known: {', '.join(allowed)}")


def _check_range(config, field: str, low: float, high: float,
                 low_open: bool = False, high_open: bool = False) -> None:
  value = _get(config, field)
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
    _fail(field, f"must be a number, got {value!r}")
  too_low = value <= low if low_open else value < low
  too_high = value >= high if high_open else value > high
  if too_low or too_high:
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    _fail(field, f"{value!r} is outside {interval}")


def _check_int(config, field: str, minimum: int) -> None:
  value = _get(config, field)
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    _fail(field, f"must be an integer >= {minimum}, got {value!r}")


def _get(config, field: str) -> Any:
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field that needs no data; raises ConfigError naming the field."""
  _check_int(config, "seed", 0)
  stages = tuple(config.stages)
  if not stages:
    _fail("stages", f"must name at least one stage; known: {', '.join(STAGE_NAMES)}")
  for stage in stages:
    if stage not in STAGE_NAMES:
      _fail("stages", f"unknown stage {stage!r}; known: {', '.join(STAGE_NAMES)}")

  _check_choice(config, "data.source", DATA_SOURCES)
  if config.data.source == "cifar10_dir" and not config.data.path:
    _fail("data.path", "is empty; source='cifar10_dir' needs the directory of a "
          "cifar-10-batches-py layout")
  if config.data.source == "tfds" and not config.data.name:
    _fail("data.name", "is empty; source='tfds' needs a TFDS dataset name such as 'cifar10'")
  _check_int(config, "data.clean_set_size", 1)
  _check_int(config, "data.train_limit", 0)
  _check_int(config, "data.test_limit", 0)

  _check_choice(config, "trigger.kind", TRIGGER_KINDS)
  if config.trigger.kind == "patch":
    _check_int(config, "trigger.size", 1)
    _check_choice(config, "trigger.position", PATCH_POSITIONS)
    _check_choice(config, "trigger.pattern", PATCH_PATTERNS)
    offset = tuple(config.trigger.offset)
    if len(offset) != 2 or not all(isinstance(v, int) and v >= 0 for v in offset):
      _fail("trigger.offset", f"must be two integers >= 0 (row, col), got {offset!r}")
  else:
    _check_choice(config, "trigger.pattern", BLEND_PATTERNS)
    _check_range(config, "trigger.alpha", 0.0, 1.0, low_open=True)
    _check_int(config, "trigger.noise_seed", 0)
  color = tuple(config.trigger.color)
  if not color or not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in color):
    _fail("trigger.color", f"must be values in [0, 1], one per channel, got {color!r}")
  if config.trigger.pattern == "file" and not config.trigger.pattern_file:
    _fail("trigger.pattern_file", "is empty; pattern='file' needs a .npy or image file")

  _check_range(config, "poison.rate", 0.0, 1.0, low_open=True, high_open=True)
  _check_int(config, "poison.target", 0)
  _check_choice(config, "poison.mode", POISON_MODES)
  _check_choice(config, "poison.stamp", STAMP_MODES)

  _check_choice(config, "model.name", MODEL_NAMES)
  _check_range(config, "model.width", 0.0, 64.0, low_open=True)
  for layer in config.model.probe_layers:
    if not isinstance(layer, str):
      _fail("model.probe_layers", f"must be layer names, got {layer!r}")

  _check_int(config, "train.epochs", 1)
  _check_int(config, "train.batch_size", 1)
  _check_int(config, "train.eval_batch_size", 1)
  _check_range(config, "train.learning_rate", 0.0, 10.0, low_open=True)
  _check_range(config, "train.momentum", 0.0, 1.0, high_open=True)
  _check_range(config, "train.weight_decay", 0.0, 1.0)
  _check_int(config, "train.crop_padding", 0)
  _check_choice(config, "train.compute_dtype", COMPUTE_DTYPES)


def validate_against_data(config: ml_collections.ConfigDict, *, image_shape: Sequence[int],
                          num_classes: int, num_train: int) -> None:
  """Checks the fields that depend on the dataset, before any model is built."""
  height, width, channels = image_shape
  if config.poison.target >= num_classes:
    _fail("poison.target", f"{config.poison.target} is not a class of this dataset "
          f"(classes 0..{num_classes - 1})")
  color = tuple(config.trigger.color)
  if len(color) not in (1, channels):
    _fail("trigger.color", f"has {len(color)} values; the images have {channels} channels")
  if config.trigger.kind == "patch":
    size = config.trigger.size
    if config.trigger.position == "offset":
      row, col = config.trigger.offset
    else:
      row, col = 0, 0
    if row + size > height or col + size > width:
      _fail("trigger", f"a {size}x{size} patch at {config.trigger.position} "
            f"(offset {(row, col)}) does not fit a {height}x{width} image")
  if config.data.clean_set_size >= num_train:
    _fail("data.clean_set_size", f"{config.data.clean_set_size} leaves no training images "
          f"out of {num_train}")
  if config.train.batch_size > num_train - config.data.clean_set_size:
    _fail("train.batch_size", f"{config.train.batch_size} is larger than the "
          f"{num_train - config.data.clean_set_size} training images")
  if config.train.crop_padding >= min(height, width):
    _fail("train.crop_padding", f"{config.train.crop_padding} is not smaller than the image")
