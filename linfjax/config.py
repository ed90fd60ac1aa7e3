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

from linfjax import errors
from linfjax import models
from linfjax.detection import outliers
from linfjax.training import train
from linfjax.attacks import triggers
from linfjax.defenses import pruning as prune_lib

MODEL_NAMES = ("cnn", "preact_resnet18", "vgg11", "vgg16", "alexnet")
DATA_SOURCES = ("cifar10_dir", "tfds", "image_folder", "gtsrb")
TRIGGER_KINDS = ("patch", "blend", "sig", "wanet")
PATCH_PATTERNS = ("solid", "checkerboard", "file")
BLEND_PATTERNS = ("noise", "file")
PATCH_POSITIONS = ("bottom_right", "bottom_left", "top_right", "top_left", "offset")
POISON_MODES = ("all_to_one", "all_to_all")
STAMP_MODES = ("after_augmentation", "before_augmentation")
COMPUTE_DTYPES = ("float32", "bfloat16")
PADDING_MODES = tuple(train.PADDING_MODES)
HEAD_POOLS = ("",) + tuple(models.HEAD_POOLS)
STAGE_NAMES = ("train", "reverse", "analysis", "prune")
PRUNE_NORMS = ("linf", "l2", "l1")
REVERSE_STATISTICS = tuple(outliers.STATISTICS)
PRUNE_SCORES = ("shift", "triggered")
PRUNE_LEVEL_UNITS = ("fraction", "count")
FINE_PRUNING_LEVELS = ("ca_drop", "defender_asr")
MULTI_LAYER_RANKINGS = prune_lib.MULTI_LAYER_RANKINGS
# Baseline defenses the prune stage can run beside the lp methods (linfjax/baselines/).
PRUNE_BASELINES = ("anp", "clp", "nc_unlearning")

# Named trigger settings: what configs/cifar_{patch,blend,sig,wanet}.py use, and what a
# grid axis `trigger=patch,blend,sig,wanet` sets (linfjax/runs/grid.py). Each sets how the
# attack poisons (clean_label, cross_ratio) too, so a grid's runs differ only in the attack.
TRIGGER_PRESETS = {
    # BadNets: a 3x3 white patch at the bottom-right corner.
    "patch": dict(kind="patch", size=3, position="bottom_right", pattern="solid",
                  color=(1.0, 1.0, 1.0), clean_label=False, cross_ratio=0.0),
    # Blend: seeded uniform noise mixed in with alpha 0.2 (BackdoorBench's blended default).
    "blend": dict(kind="blend", pattern="noise", alpha=0.2, noise_seed=0, clean_label=False,
                  cross_ratio=0.0),
    # SIG: a horizontal sinusoid, delta 40/255, f 6 (BackdoorBench's defaults), clean-label
    # as published: only target-class images are poisoned, labels unchanged.
    "sig": dict(kind="sig", amplitude=triggers.SIG_AMPLITUDE, frequency=triggers.SIG_FREQUENCY,
                clean_label=True, cross_ratio=0.0),
    # WaNet: k 4, s 0.5, grid_rescale 1, noise mode with cross_ratio 2 (its published defaults).
    "wanet": dict(kind="wanet", grid_size=triggers.WANET_GRID_SIZE,
                  strength=triggers.WANET_STRENGTH, grid_rescale=triggers.WANET_GRID_RESCALE,
                  warp_seed=0, clean_label=False, cross_ratio=triggers.WANET_CROSS_RATIO),
}

# Where the quick configs' data sit relative to a checkout of the repo: the CIFAR-10 subset
# and the whole of GTSRB at 32x32 (elsewhere: `python -m linfjax.fetch [gtsrb] DIR`).
SHARED_SUBSET = "../shared/data/cifar10-subset"
SHARED_GTSRB = "../shared/data/gtsrb32"


class ConfigError(errors.UserError, ValueError):
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
  # Directory of a cifar-10-batches-py layout (source="cifar10_dir"), of an image folder
  # dataset, <path>/<split>/<class>/<images> (source="image_folder"), or the folder holding
  # GTSRB/ as its official archives unpack (source="gtsrb").
  config.data.path = ""
  config.data.train_split = "train"  # TFDS split, or image folder split folder.
  config.data.test_split = "test"
  # (height, width) every image is resized to (sources tfds, image_folder, gtsrb); () keeps
  # the stored size, which must then be the same for every image.
  config.data.image_size = ()
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
  config.trigger.amplitude = triggers.SIG_AMPLITUDE  # SIG's delta, in [0, 1] pixel units.
  config.trigger.frequency = triggers.SIG_FREQUENCY  # SIG's f, periods across the width.
  config.trigger.grid_size = triggers.WANET_GRID_SIZE  # WaNet's control grid side k.
  config.trigger.strength = triggers.WANET_STRENGTH  # WaNet's warp strength s.
  config.trigger.grid_rescale = triggers.WANET_GRID_RESCALE  # WaNet's grid_rescale.
  config.trigger.warp_seed = 0  # Seed of WaNet's control grid.
  # Clean-label poisoning: poison only target-class images and keep their labels (SIG as
  # published); False relabels non-target images to the attack's label (METHOD.md).
  config.trigger.clean_label = False
  # WaNet's noise mode: round(cross_ratio * P) more examples (P poisoned ones) are warped
  # with fresh noise in every step and keep their true labels; 0 turns it off.
  config.trigger.cross_ratio = 0.0

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
  # Pooling before the dense head: "" is the model's own (global average; VGG: global max),
  # or "avg", "max", "max2_avg" (a 2x2 max-pool, then the global average).
  config.model.head_pool = ""

  config.train = ml_collections.ConfigDict()
  config.train.epochs = 100
  config.train.batch_size = 128
  config.train.learning_rate = 0.01
  config.train.momentum = 0.9
  config.train.nesterov = False  # Nesterov momentum (BackdoorBench: plain momentum).
  config.train.weight_decay = 5e-4
  config.train.crop_padding = 4
  config.train.padding_mode = "zeros"  # Crop padding: "zeros" (torchvision's) or "reflect".
  config.train.flip = True
  config.train.compute_dtype = "float32"
  config.train.eval_batch_size = 500

  # Neural Cleanse (linfjax/detection/neural_cleanse.py, nc_schedule.py, outliers.py). Values from NC's code
  # (its GTSRB example) unless marked "ours". A step is `mini_batches` Adam updates followed
  # by the adaptive-cost bookkeeping; patiences are counted in Adam updates.
  config.reverse = ml_collections.ConfigDict()
  config.reverse.steps = 1000
  config.reverse.mini_batches = 16  # Ours: one pass over the 500 images of S (NC: 1000 / 32).
  config.reverse.batch_size = 32
  config.reverse.learning_rate = 0.1  # Adam, betas (0.5, 0.9); NC's tanh parametrisation.
  config.reverse.init_cost = 1e-3
  # NC's code starts the cost at 0 and sets it to init_cost after `patience` successes;
  # BackdoorBench's NC starts at init_cost (ours: the default).
  config.reverse.reset_cost_to_zero = False
  config.reverse.cost_multiplier = 2.0  # Up by this, down by its 1.5th power.
  config.reverse.patience = 80  # Adam updates of success (failure) before the cost moves (NC: 5 steps).
  config.reverse.attack_success_threshold = 0.99
  # Images of S each step's success is judged on by a forward-only pass of the current
  # trigger (ours); 0: the mean over the step's mini-batches, as NC.
  config.reverse.success_images = 0
  config.reverse.early_stop_threshold = 1.0  # Stalled: best norm >= this x the earlier best.
  config.reverse.early_stop_patience = 400  # Stalled Adam updates before a class stops (NC: 25 steps).
  # The outlier index (linfjax/detection/outliers.py): NC's MAD index ("nc"), the same on log norms
  # ("log"), or median norm / class norm ("ratio", ours; README "Defaults we chose").
  config.reverse.statistic = "ratio"
  # The index above which a class is flagged; 0: the statistic's own (nc and log: NC's 2;
  # ratio: 3, ours).
  config.reverse.anomaly_threshold = 0.0
  config.reverse.checkpoint_every = 10  # Ours: steps between checkpoints.

  # The lp-based pruning defense and Fine-Pruning (linfjax/defenses/pruning.py, METHOD.md).
  config.prune = ml_collections.ConfigDict()
  config.prune.layer = ""  # Empty: the model's default probe (last conv map before pooling).
  config.prune.norms = PRUNE_NORMS
  config.prune.score = "shift"  # "shift": delta_k; "triggered": mean triggered norm.
  config.prune.level_unit = "fraction"  # Levels as fractions of K, or as neuron counts.
  # Ours: 1 % steps up to 10 %, where a backdoor's few neurons sit, then coarser up to 90 %
  # for Fine-Pruning's dormant neurons. Level 0 (nothing pruned) is always added.
  config.prune.levels = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1,
                         0.12, 0.14, 0.16, 0.18, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55,
                         0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
  config.prune.tau = 5.0  # r*: defender-side ASR at most this (percent) ...
  config.prune.delta = 3.0  # ... with the CA drop on S at most this (points).
  # Also report each lp-pruned model fine-tuned on S at r*, mask fixed (`<method>_ft`).
  config.prune.fine_tune = True
  config.prune.fine_tune_epochs = 10  # Ours, for every fine-tuned model.
  config.prune.fine_tune_learning_rate = 0.01  # SGD with the train block's momentum/decay.
  config.prune.fine_tune_batch_size = 32  # Ours: S is small (500 images).
  config.prune.fine_pruning = True  # Also run Fine-Pruning (Liu et al., 2018).
  # Fine-Pruning's level: "ca_drop" prunes until the CA drop on S exceeds delta (as
  # published, no trigger needed); "defender_asr" chooses it by the lp methods' rule.
  config.prune.fine_pruning_level = "ca_drop"
  config.prune.fine_tuning_control = True  # Fine-tune the unpruned model alike (a control).
  # Beyond the paper (ours): prune several layers at once, "per_layer" (each layer ranked by
  # its own shift) or "joint" (all neurons ranked by their relative shift); "" turns it off.
  config.prune.multi_layer = "joint"
  config.prune.multi_layers = ()  # Empty: every layer of the model.
  config.prune.multi_layer_norms = ("linf",)
  # Fractions of the layers' neurons; 0 (nothing pruned) is always added.
  config.prune.multi_layer_levels = (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1,
                                     0.12, 0.15, 0.2, 0.25, 0.3)
  # Ours: masks vmapped together in a sweep call (chunks bound memory; 8 was fastest on CPU).
  config.prune.mask_batch = 8
  # Baselines beside the lp methods (linfjax/baselines/), for the synthetic trigger's entry:
  # any of "anp", "clp", "nc_unlearning"; none by default (configs/grid_attacks.py runs all).
  config.prune.baselines = ()
  config.prune.anp_iterations = 2000  # ANP's mask updates on S (the authors' 2000).
  config.prune.anp_threshold = 0.2  # ANP prunes neurons whose mask ends at or below this.
  config.prune.clp_u = 3.0  # CLP prunes channels above mean + u * std of their layer.
  # Neural Cleanse unlearning: the share of S stamped with the synthetic trigger (NC's 0.2);
  # epochs, learning rate and batch are the fine_tune_* fields.
  config.prune.unlearning_share = 0.2

  # A grid of runs (linfjax/runs/grid.py, linfjax/runs/sweep.py); empty axes: a single run.
  config.sweep = ml_collections.ConfigDict()
  config.sweep.axes = ""  # e.g. "trigger=patch,blend poison.rate=0.05,0.1 seed=0,1,2".
  # Models trained in lockstep (vmapped over runs) per device. 1: one after another on a
  # single device, the measured fastest on CPU (benchmarks/grid.py); with several devices
  # the runs axis is sharded over them, one model per device at a time.
  config.sweep.models_per_device = 1
  # Work that several runs need (each distinct vanilla model) done once per grid, in
  # GRID/shared/ (linfjax/runs/shared_work.py); False: every run does all its own work.
  config.sweep.share = True
  return config


def make_quick(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The laptop variant: small CNN on the shared subset, a few minutes on 2 cores."""
  config.data.source = "cifar10_dir"
  config.data.path = SHARED_SUBSET
  config.model.name = "cnn"
  config.model.width = 1.0
  config.train.epochs = 10
  config.train.learning_rate = 0.05
  # Ours, from an independent reference recipe and measured over 5 seeds (README,
  # "Defaults we chose"): mirrored crop padding, Nesterov momentum, and a 2x2 max-pool
  # before the global average.
  config.train.padding_mode = "reflect"
  config.train.nesterov = True
  config.model.head_pool = "max2_avg"
  # Ours: both models' reverse engineering in about a minute and a half each on 2 CPU cores
  # (README, "Defaults we chose", has the budget curve these come from).
  config.reverse.steps = 16
  config.reverse.mini_batches = 4
  config.reverse.batch_size = 16
  config.reverse.patience = 8
  config.reverse.success_images = 128
  config.reverse.early_stop_patience = 20
  config.reverse.checkpoint_every = 4
  # Ours: keeps the prune stage, fine-tuning included, near a minute on 2 CPU cores.
  config.prune.fine_tune_epochs = 2
  # Ours: ANP at a tenth of the authors' 2000 updates (still ~50 passes over S), about
  # 0.8 s an update on 2 loaded CPU cores; only runs that list it in prune.baselines.
  config.prune.anp_iterations = 200
  return config


def use_gtsrb(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """GTSRB as it ships (43 classes), resized to 32x32, no flips (a flip turns one sign into
  another), S held out by track: ours, one 30-frame track per class (1,290 images).

  The quick variant reads ../shared/data/gtsrb32, trains 3 epochs (CA ~96 / ASR ~95 for the
  small CNN, README "GTSRB") and runs every baseline; the full one trains BackdoorBench's 50
  epochs on `data.path`, which the user gives.
  """
  config.data.source = "gtsrb"
  config.data.path = SHARED_GTSRB if variant == "quick" else ""
  config.data.image_size = (32, 32)
  config.data.clean_set_size = 1290
  config.train.flip = False
  config.train.epochs = 3 if variant == "quick" else 50
  if variant == "quick":
    config.prune.baselines = PRUNE_BASELINES
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


# While `checked_rules` runs `validate`, every `_check_*` call records its field's rule here,
# so the field listing (linfjax/config_fields.py) reads the rules off validation itself.
_rules: dict[str, str] | None = None


def _note(field: str, rule: str) -> None:
  if _rules is not None:
    _rules.setdefault(field, rule)


def checked_rules(configs: Sequence[ml_collections.ConfigDict]) -> dict[str, str]:
  """Field -> the rule `validate` checks it against (as text), over valid `configs`.

  A field checked only under some settings (say `trigger.alpha`, for blend triggers)
  appears when one of `configs` has those settings.
  """
  global _rules
  _rules = {}
  try:
    for config in configs:
      validate(config)
    return dict(_rules)
  finally:
    _rules = None


def _check_choice(config, field: str, allowed: Sequence[str]) -> None:
  _note(field, f"one of {', '.join(repr(a) for a in allowed)}")
  value = _get(config, field)
  if value not in allowed:
    _fail(field, f"unknown value {value!r}; known: {', '.join(allowed)}")


def _check_range(config, field: str, low: float, high: float,
                 low_open: bool = False, high_open: bool = False) -> None:
  _note(field, f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")
  value = _get(config, field)
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
    _fail(field, f"must be a number, got {value!r}")
  too_low = value <= low if low_open else value < low
  too_high = value >= high if high_open else value > high
  if too_low or too_high:
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    _fail(field, f"{value!r} is outside {interval}")


def _check_int(config, field: str, minimum: int) -> None:
  _note(field, f"an integer >= {minimum}")
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
  if config.data.source == "image_folder" and not config.data.path:
    _fail("data.path", "is empty; source='image_folder' needs a folder holding the train and "
          "test split folders, each with one folder of images per class")
  if config.data.source == "gtsrb" and not config.data.path:
    _fail("data.path", "is empty; source='gtsrb' needs the folder holding GTSRB/ as its "
          "official archives unpack (python -m linfjax.fetch gtsrb DIR)")
  for field in ("train_split", "test_split"):
    if not isinstance(config.data[field], str) or not config.data[field]:
      _fail(f"data.{field}", f"must be a non-empty split name, got {config.data[field]!r}")
  image_size = tuple(config.data.image_size)
  if image_size and (len(image_size) != 2 or not all(
      isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in image_size)):
    _fail("data.image_size", f"must be () or (height, width) in pixels, 1..4096, got "
          f"{image_size!r}")
  if image_size and config.data.source == "cifar10_dir":
    _fail("data.image_size", "applies to the tfds, image_folder and gtsrb sources; cifar10_dir "
          "images are 32x32")
  _check_int(config, "data.clean_set_size", 1)
  _check_int(config, "data.train_limit", 0)
  _check_int(config, "data.test_limit", 0)

  _validate_trigger(config)

  _check_range(config, "poison.rate", 0.0, 1.0, low_open=True, high_open=True)
  _check_int(config, "poison.target", 0)
  _check_choice(config, "poison.mode", POISON_MODES)
  _check_choice(config, "poison.stamp", STAMP_MODES)

  _check_choice(config, "model.name", MODEL_NAMES)
  _check_range(config, "model.width", 0.0, 64.0, low_open=True)
  _check_choice(config, "model.head_pool", HEAD_POOLS)
  if config.model.name == "alexnet" and config.model.head_pool:
    _fail("model.head_pool", f"{config.model.head_pool!r} does not apply to alexnet, whose "
          "classifier (max-pool, fc6, fc7) is its own; leave it empty")
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
  _check_choice(config, "train.padding_mode", PADDING_MODES)
  if not isinstance(config.train.nesterov, bool):
    _fail("train.nesterov", f"must be True or False, got {config.train.nesterov!r}")
  _check_choice(config, "train.compute_dtype", COMPUTE_DTYPES)

  _check_int(config, "reverse.steps", 1)
  _check_int(config, "reverse.mini_batches", 1)
  _check_int(config, "reverse.batch_size", 1)
  if "reverse" in stages and config.reverse.batch_size > config.data.clean_set_size:
    _fail("reverse.batch_size", f"{config.reverse.batch_size} is larger than the clean set "
          f"S (data.clean_set_size {config.data.clean_set_size})")
  _check_range(config, "reverse.learning_rate", 0.0, 10.0, low_open=True)
  _check_range(config, "reverse.init_cost", 0.0, 1e3, low_open=True)
  _check_range(config, "reverse.cost_multiplier", 1.0, 100.0, low_open=True)
  _check_int(config, "reverse.patience", 1)
  if not isinstance(config.reverse.reset_cost_to_zero, bool):
    _fail("reverse.reset_cost_to_zero", f"must be True or False, got "
          f"{config.reverse.reset_cost_to_zero!r}")
  _check_range(config, "reverse.attack_success_threshold", 0.0, 1.0, low_open=True)
  _check_int(config, "reverse.success_images", 0)
  _check_range(config, "reverse.early_stop_threshold", 0.0, 1.0, low_open=True)
  _check_int(config, "reverse.early_stop_patience", 1)
  _check_choice(config, "reverse.statistic", REVERSE_STATISTICS)
  _check_range(config, "reverse.anomaly_threshold", 0.0, 100.0)
  _check_int(config, "reverse.checkpoint_every", 1)

  _validate_prune(config)
  if not isinstance(config.sweep.axes, str):
    _fail("sweep.axes", f"must be a string such as 'seed=0,1,2 poison.rate=0.05,0.1', "
          f"got {config.sweep.axes!r}")
  _check_int(config, "sweep.models_per_device", 1)
  if not isinstance(config.sweep.share, bool):
    _fail("sweep.share", f"must be True or False, got {config.sweep.share!r}")


def _validate_trigger(config: ml_collections.ConfigDict) -> None:
  _check_choice(config, "trigger.kind", TRIGGER_KINDS)
  kind = config.trigger.kind
  if kind == "patch":
    _check_int(config, "trigger.size", 1)
    _check_choice(config, "trigger.position", PATCH_POSITIONS)
    _check_choice(config, "trigger.pattern", PATCH_PATTERNS)
    offset = tuple(config.trigger.offset)
    if len(offset) != 2 or not all(isinstance(v, int) and v >= 0 for v in offset):
      _fail("trigger.offset", f"must be two integers >= 0 (row, col), got {offset!r}")
  elif kind == "blend":
    _check_choice(config, "trigger.pattern", BLEND_PATTERNS)
    _check_range(config, "trigger.alpha", 0.0, 1.0, low_open=True)
    _check_int(config, "trigger.noise_seed", 0)
  elif kind == "sig":
    _check_range(config, "trigger.amplitude", 0.0, 1.0, low_open=True)
    _check_range(config, "trigger.frequency", 0.0, 1e4, low_open=True)
  else:
    _check_int(config, "trigger.grid_size", 2)
    _check_range(config, "trigger.strength", 0.0, 100.0, low_open=True)
    _check_range(config, "trigger.grid_rescale", 0.0, 10.0, low_open=True)
    _check_int(config, "trigger.warp_seed", 0)
  color = tuple(config.trigger.color)
  if not color or not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in color):
    _fail("trigger.color", f"must be values in [0, 1], one per channel, got {color!r}")
  if kind in ("patch", "blend") and config.trigger.pattern == "file" \
      and not config.trigger.pattern_file:
    _fail("trigger.pattern_file", "is empty; pattern='file' needs a .npy or image file")
  if not isinstance(config.trigger.clean_label, bool):
    _fail("trigger.clean_label", f"must be True or False, got {config.trigger.clean_label!r}")
  if config.trigger.clean_label and config.poison.mode != "all_to_one":
    _fail("trigger.clean_label", f"clean-label poisoning keeps the labels, so it needs "
          f"poison.mode='all_to_one' (got {config.poison.mode!r}); set "
          "trigger.clean_label=False for all-to-all")
  _check_range(config, "trigger.cross_ratio", 0.0, 100.0)
  if config.trigger.cross_ratio and kind != "wanet":
    _fail("trigger.cross_ratio", f"{config.trigger.cross_ratio!r}: only the wanet trigger has a "
          f"noise mode; set it to 0 for kind {kind!r}")


def _validate_prune(config: ml_collections.ConfigDict) -> None:
  prune = config.prune
  if prune.layer:
    model = models.create(config.model.name, num_classes=1, width=config.model.width)
    known = models.layer_names(model)
    if prune.layer not in known:
      _fail("prune.layer", f"unknown layer {prune.layer!r} of model {config.model.name!r}; "
            f"known: {', '.join(known)} (or empty for the default probe)")
  chosen = tuple(prune.norms)
  if not chosen or len(set(chosen)) != len(chosen) or not set(chosen) <= set(PRUNE_NORMS):
    _fail("prune.norms", f"must be distinct names from {', '.join(PRUNE_NORMS)}, got {chosen!r}")
  _check_choice(config, "prune.score", PRUNE_SCORES)
  _check_choice(config, "prune.level_unit", PRUNE_LEVEL_UNITS)
  levels = tuple(prune.levels)
  if not levels:
    _fail("prune.levels", "is empty; give the pruning levels to sweep")
  for level in levels:
    if prune.level_unit == "fraction":
      if not isinstance(level, (int, float)) or isinstance(level, bool) or not 0 <= level < 1:
        _fail("prune.levels", f"{level!r} is not a fraction of the layer's neurons in [0, 1)")
    elif not isinstance(level, int) or isinstance(level, bool) or level < 0:
      _fail("prune.levels", f"{level!r} is not a neuron count (an integer >= 0)")
  _check_range(config, "prune.tau", 0.0, 100.0)
  _check_range(config, "prune.delta", 0.0, 100.0)
  for flag in ("fine_tune", "fine_pruning", "fine_tuning_control"):
    if not isinstance(prune[flag], bool):
      _fail(f"prune.{flag}", f"must be True or False, got {prune[flag]!r}")
  _check_int(config, "prune.fine_tune_epochs", 1)
  _check_int(config, "prune.fine_tune_batch_size", 1)
  _check_int(config, "prune.mask_batch", 1)
  _check_range(config, "prune.fine_tune_learning_rate", 0.0, 10.0, low_open=True)
  _check_choice(config, "prune.fine_pruning_level", FINE_PRUNING_LEVELS)
  baselines = tuple(prune.baselines)
  if len(set(baselines)) != len(baselines) or not set(baselines) <= set(PRUNE_BASELINES):
    _fail("prune.baselines", f"must be distinct names from {', '.join(PRUNE_BASELINES)}, "
          f"got {baselines!r}")
  _check_int(config, "prune.anp_iterations", 1)
  _check_range(config, "prune.anp_threshold", 0.0, 1.0)
  _check_range(config, "prune.clp_u", 0.0, 100.0)
  _check_range(config, "prune.unlearning_share", 0.0, 1.0, low_open=True)
  _check_choice(config, "prune.multi_layer", ("",) + MULTI_LAYER_RANKINGS)
  if prune.multi_layer:
    known = models.layer_names(models.create(config.model.name, num_classes=1,
                                             width=config.model.width))
    for layer in prune.multi_layers:
      if layer not in known:
        _fail("prune.multi_layers", f"unknown layer {layer!r} of model "
              f"{config.model.name!r}; known: {', '.join(known)} (or empty for all)")
    chosen = tuple(prune.multi_layer_norms)
    if not chosen or len(set(chosen)) != len(chosen) or not set(chosen) <= set(PRUNE_NORMS):
      _fail("prune.multi_layer_norms", f"must be distinct names from {', '.join(PRUNE_NORMS)}, "
            f"got {chosen!r}")
    levels = tuple(prune.multi_layer_levels)
    if not levels or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                             and 0 < v < 1 for v in levels) or list(levels) != sorted(set(levels)):
      _fail("prune.multi_layer_levels", f"must be distinct increasing fractions in (0, 1), got "
            f"{levels!r}")


def validate_against_data(config: ml_collections.ConfigDict, *, image_shape: Sequence[int],
                          num_classes: int, num_train: int) -> None:
  """Checks the fields that depend on the dataset, before any model is built."""
  height, width, channels = image_shape
  if config.poison.target >= num_classes:
    _fail("poison.target", f"{config.poison.target} is not a class of this dataset "
          f"(classes 0..{num_classes - 1})")
  color = tuple(config.trigger.color)
  if config.trigger.kind == "patch" and len(color) not in (1, channels):
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
  if config.trigger.kind == "wanet" and config.trigger.grid_size > min(height, width):
    _fail("trigger.grid_size", f"{config.trigger.grid_size} is larger than the "
          f"{height}x{width} image")
  if config.data.clean_set_size >= num_train:
    _fail("data.clean_set_size", f"{config.data.clean_set_size} leaves no training images "
          f"out of {num_train}")
  if config.train.batch_size > num_train - config.data.clean_set_size:
    _fail("train.batch_size", f"{config.train.batch_size} is larger than the "
          f"{num_train - config.data.clean_set_size} training images")
  if config.train.crop_padding >= min(height, width):
    _fail("train.crop_padding", f"{config.train.crop_padding} is not smaller than the image")


if __name__ == "__main__":  # `python -m linfjax.config`: every field, default, rule and meaning.
  import sys

  from linfjax import config_fields
  sys.exit(config_fields.main(sys.argv))
