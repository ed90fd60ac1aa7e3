"""Poisoning a training set: which examples, which labels, and where the trigger goes.

docs/method.md: `round(rho * N)` training examples, drawn with the run's seed from
examples whose label is not the target (all-to-one; any example for all-to-all),
are replaced by `(T(x), y_t)`. Two attacks poison differently:
  - clean-label (SIG as published): the examples are drawn from the target class and
    keep their labels; only the images carry the trigger (BackdoorBench's clean-label
    selection, with rho still a share of all N training examples);
  - the noise mode (WaNet's, Input-aware's): `round(cross_ratio * P)` more examples,
    drawn from the non-poisoned ones, keep their true labels and are, in every training
    step, warped with fresh noise (WaNet) or stamped with another image's pattern
    (Input-aware) (`attacks.apply_noise_mode`).
The result is a `PoisonedSet` of uint8 images, the labels the model is trained on,
and per-example flags telling the training step to stamp the trigger (or the noise
mode) after augmentation.

References:
  Barni, Kallas and Tondi, "A new Backdoor Attack in CNNs by training set corruption
  without label poisoning", ICIP 2019. Nguyen and Tran, "WaNet - Imperceptible
  Warping-based Backdoor Attack", ICLR 2021.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from linfjax import attacks, keys, settings
from linfjax.settings import choice, integer, number, spec


MODES = ("all_to_one", "all_to_all")
STAMPS = ("after_augmentation", "before_augmentation")


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The `poison` block."""
  rate: float = spec(0.1, number(0.0, 1.0, low_open=True, high_open=True),
                     "Share of the training examples poisoned.")
  target: int = spec(0, integer(0), "The attack's target class y_t.")
  mode: str = spec("all_to_one", choice(*MODES), "all_to_one: y -> y_t; all_to_all: "
                   "y -> (y + 1) mod C.")
  stamp: str = spec("after_augmentation", choice(*STAMPS),
                    'Where the trigger is stamped on a poisoned training image: '
                    '"after_augmentation" keeps it at its fixed place (ours, the default: crop '
                    'and flip otherwise move and blur a corner patch); "before_augmentation" is '
                    "how BackdoorBench stores poisoned images.")


@dataclasses.dataclass(frozen=True)
class PoisonedSet:
  """A training set ready for the device.

  images: uint8 [N, H, W, C] (stamped already when the stamp is before augmentation).
  labels: int32 [N], the labels trained on (poisoned ones relabelled).
  stamp_after_augmentation: bool [N], examples the training step must stamp.
  poison_indices: int64 [P], positions (into this set) of the poisoned examples.
  noise_mode: bool [N], examples the training step warps with noise (WaNet), labels kept.
  noise_indices: int64 [Q], their positions.
  """
  images: np.ndarray
  labels: np.ndarray
  stamp_after_augmentation: np.ndarray
  poison_indices: np.ndarray
  noise_mode: np.ndarray
  noise_indices: np.ndarray


def poison_count(num_examples: int, rate: float) -> int:
  """`round(rate * N)`: the number of examples a poison rate replaces."""
  return int(round(rate * num_examples))


def select_poison_indices(labels: np.ndarray, *, rate: float, target: int, mode: str,
                          seed: int, clean_label: bool = False) -> np.ndarray:
  """Draws the poisoned examples: sorted int64 indices into `labels`.

  Eligible are the examples whose label is not the target (all-to-one), every example
  (all-to-all), or, for clean-label poisoning, the target class's examples.

  Raises:
    ValueError: when fewer eligible examples exist than the rate asks for, or clean-label
      poisoning is asked for with all-to-all labels.
  """
  count = poison_count(len(labels), rate)
  if clean_label:
    if mode != "all_to_one":
      raise ValueError("clean-label poisoning keeps the labels, so it needs mode all_to_one")
    eligible, which = np.flatnonzero(labels == target), f"belong to the target class {target}"
  elif mode == "all_to_one":
    eligible, which = np.flatnonzero(labels != target), f"have a label other than the target {target}"
  else:
    eligible, which = np.arange(len(labels)), "exist"
  if count > len(eligible):
    raise ValueError(f"poison rate {rate} asks for {count} examples but only {len(eligible)} "
                     f"{which}")
  if count == 0:
    raise ValueError(f"poison rate {rate} of {len(labels)} examples rounds to 0 poisoned ones")
  chosen = keys.numpy_rng(seed, keys.POISON).choice(eligible, size=count, replace=False)
  return np.sort(chosen).astype(np.int64)


def select_noise_indices(num_examples: int, poison_indices: np.ndarray, *, cross_ratio: float,
                         seed: int) -> np.ndarray:
  """WaNet's noise-mode examples: `round(cross_ratio * P)` of the non-poisoned ones, sorted.

  Raises:
    ValueError: when fewer non-poisoned examples exist than that.
  """
  count = int(round(cross_ratio * len(poison_indices)))
  others = np.setdiff1d(np.arange(num_examples), poison_indices)
  if count > len(others):
    raise ValueError(f"cross_ratio {cross_ratio} asks for {count} noise-mode examples but only "
                     f"{len(others)} are not poisoned")
  chosen = keys.numpy_rng(seed, keys.NOISE_EXAMPLES).choice(others, size=count, replace=False)
  return np.sort(chosen).astype(np.int64)


def poisoned_labels(labels: np.ndarray, *, mode: str, target: int, num_classes: int):
  """The label a poisoned example is trained on: `y_t` (all-to-one) or `(y + 1) mod C`.

  NumPy, not jnp: the number of poisoned examples changes with the poison rate, and an
  eager jnp op compiles once per shape, so a grid over rates would recompile.
  """
  labels = np.asarray(labels)
  if mode == "all_to_one":
    return np.full_like(labels, target)
  if mode == "all_to_all":
    return (labels + 1) % num_classes
  raise ValueError(f"unknown poison mode {mode!r}; known: all_to_one, all_to_all")


def to_uint8(images) -> np.ndarray:
  """[0, 1] floats to uint8 pixels, rounding to nearest."""
  return np.asarray(jnp.clip(jnp.round(jnp.asarray(images) * 255.0), 0, 255), np.uint8)


def poison(images: np.ndarray, labels: np.ndarray, trigger: attacks.AnyTrigger, *, rate: float,
           target: int, mode: str, stamp: str, num_classes: int, seed: int,
           clean_label: bool = False, cross_ratio: float = 0.0) -> PoisonedSet:
  """Builds the backdoored training set from clean uint8 images and labels.

  `clean_label` keeps the poisoned examples' labels (drawn from the target class);
  `cross_ratio` adds WaNet's noise-mode examples (always warped in the training step,
  with fresh noise, whatever `stamp` says).
  """
  indices = select_poison_indices(labels, rate=rate, target=target, mode=mode, seed=seed,
                                  clean_label=clean_label)
  new_labels = np.array(labels, np.int32)
  if not clean_label:
    new_labels[indices] = np.asarray(
        poisoned_labels(labels[indices], mode=mode, target=target, num_classes=num_classes))
  noise_indices = select_noise_indices(len(labels), indices, cross_ratio=cross_ratio, seed=seed)
  noise_flags = np.zeros(len(labels), bool)
  noise_flags[noise_indices] = True
  flags = np.zeros(len(labels), bool)
  images = np.array(images)
  if stamp == "after_augmentation":
    flags[indices] = True
  elif stamp == "before_augmentation":
    stamped = attacks.apply(trigger, jnp.asarray(images[indices], jnp.float32) / 255.0)
    images[indices] = to_uint8(stamped)
  else:
    raise ValueError(f"unknown stamp mode {stamp!r}; known: after_augmentation, "
                     "before_augmentation")
  return PoisonedSet(images, new_labels, flags, indices, noise_flags, noise_indices)


def from_config(images: np.ndarray, labels: np.ndarray, trigger: attacks.AnyTrigger, *,
                poison_block, trigger_block, num_classes: int, seed: int) -> PoisonedSet:
  """`poison` as a config asks: its `poison` block (rate, target, mode, stamp) and the
  poisoning fields of its `trigger` block (`clean_label`, WaNet's `cross_ratio`)."""
  return poison(images, labels, trigger, rate=poison_block.rate, target=poison_block.target,
                mode=poison_block.mode, stamp=poison_block.stamp, num_classes=num_classes,
                seed=seed, clean_label=trigger_block.clean_label,
                cross_ratio=trigger_block.cross_ratio)


def clean(images: np.ndarray, labels: np.ndarray) -> PoisonedSet:
  """The vanilla model's training set: the same images, nothing poisoned."""
  return PoisonedSet(np.asarray(images), np.asarray(labels, np.int32),
                     np.zeros(len(labels), bool), np.zeros(0, np.int64),
                     np.zeros(len(labels), bool), np.zeros(0, np.int64))
