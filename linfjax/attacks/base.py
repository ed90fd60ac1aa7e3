"""What every attack shares: the trigger protocol, `apply` and `region`, and the `Attack` entry.

A trigger is a NamedTuple of arrays (a pytree, so a stack of triggers of one kind has a
leading axis that `jax.vmap` maps over) with two methods:
  - `stamp(images)`: the triggered batch, images [B, H, W, C] float32 in [0, 1];
  - `region()`: [H, W] bool, where the trigger changes the image;
and, where the attack has one, `noise_mode(images, key)` (WaNet's, Input-aware's). `apply`,
`region` and `apply_noise_mode` are what every caller uses; a trigger's type is static under
`jit`, so each kind compiles to its own code.

An `Attack` (one per file in linfjax/attacks/, listed in `ATTACKS`) says how a config's
`trigger` block builds its trigger, which fields of that block it reads (its `Settings`),
how it checks them against the data, and the preset a grid axis `trigger=NAME` applies.

Some attacks are made on a clean model before the backdoored one trains (LF's universal
perturbation, TrojanNN's neuron-driven patch, the label-consistent attack's adversarial
images): their entry has a `prepare` hook (a new trigger) and/or a `perturb_poisoned` hook
(new images for the poisoned examples), and both receive the run's vanilla model as a
`CleanModel` of plain functions, so this floor needs nothing from the models above it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Protocol

import chex
import jax
import jax.numpy as jnp
import numpy as np

from linfjax import errors, pixels
from linfjax import settings as settings_lib


class TriggerError(errors.UserError, ValueError):
  """A trigger's parameters do not describe a trigger for these images."""


class TriggerLike(Protocol):
  """The methods a trigger type has (see the module docstring)."""

  def stamp(self, images: jax.Array) -> jax.Array: ...

  def region(self) -> jax.Array: ...


def apply(trigger: TriggerLike, images: jax.Array) -> jax.Array:
  """Stamps a trigger on a batch.

  Args:
    trigger: a trigger for images of this size.
    images: [B, H, W, C] float in [0, 1] (`pixels.to_unit_float` converts uint8 pixels; a
      uint8 batch is refused, since a blend mask of 0.2 cast to uint8 is 0).

  Returns:
    [B, H, W, C], computed in float32 and returned in the images' dtype.
  """
  chex.assert_rank(images, 4)
  pixels.require_float(images, "attacks.apply")
  return trigger.stamp(images.astype(jnp.float32)).astype(images.dtype)


def region(trigger: TriggerLike) -> jax.Array:
  """Where a trigger changes the image: [H, W] bool (everywhere for whole-image triggers)."""
  return trigger.region()


def apply_noise_mode(trigger: TriggerLike, images: jax.Array, key: jax.Array) -> jax.Array:
  """The attack's noise mode (WaNet's: the warp jittered by fresh noise; Input-aware's: another
  image's pattern; labels kept); the images unchanged for attacks without one."""
  noise_mode = getattr(trigger, "noise_mode", None)
  if noise_mode is None:
    return images
  return noise_mode(images.astype(jnp.float32), key).astype(images.dtype)


def check_unit_interval(array: np.ndarray, what: str) -> None:
  if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
    raise TriggerError(f"{what} must hold values in [0, 1] (found {array.min()}..{array.max()})")


class CleanModel(NamedTuple):
  """A clean (vanilla) model and the attacker's clean data, as a prepared attack sees them.

  logits: images [B, H, W, C] float32 in [0, 1] -> logits [B, num_classes] (jittable);
  features: images -> the activation map of the model's last conv layer [B, h, w, K];
  images, labels: the clean training images (uint8 [N, H, W, C]) and labels [N];
  target: the attack's target class; key: the attack's own random stream.
  """
  logits: Callable[[jax.Array], jax.Array]
  features: Callable[[jax.Array], jax.Array]
  images: np.ndarray
  labels: np.ndarray
  target: int
  key: jax.Array


@dataclasses.dataclass(frozen=True)
class Attack:
  """One attack of `ATTACKS`.

  settings: the `trigger` block's fields the attack reads (linfjax/settings.py);
  build: (its settings, image shape (H, W, C)) -> the trigger;
  check: (its settings, "trigger") -> None, raising ConfigError for values it cannot use;
  check_data: (its settings, image shape) -> None, raising ConfigError when the trigger does
    not fit the images (checked before any compute);
  preset: the trigger block fields `trigger=NAME` sets (kind, its parameters, and how it
    poisons: clean_label, cross_ratio);
  description: one line for listings and reports;
  has_region: whether its trigger leaves part of the image untouched (a patch), so trigger
    recovery can be measured;
  has_noise_mode: whether its trigger has a `noise_mode` (WaNet's noise, Input-aware's cross
    mode), so `trigger.cross_ratio` may add noise-mode examples;
  prepare: (its settings, the built trigger, CleanModel) -> the trigger the attack uses,
    optimised on the clean model (None: the built trigger is used as it is);
  perturb_poisoned: (its settings, CleanModel, uint8 images [P, H, W, C], labels [P]) -> uint8
    images that replace the poisoned examples before they are stamped (None: kept).
  """
  settings: type[settings_lib.Settings]
  build: Callable[[Any, tuple[int, int, int]], TriggerLike]
  preset: dict
  description: str
  check: Callable[[Any, str], None] = lambda values, prefix: None
  check_data: Callable[[Any, tuple[int, int, int]], None] = lambda values, shape: None
  has_region: bool = False
  has_noise_mode: bool = False
  prepare: Callable[[Any, TriggerLike, CleanModel], TriggerLike] | None = None
  perturb_poisoned: Callable[[Any, CleanModel, np.ndarray, np.ndarray], np.ndarray] | None = None

  @property
  def needs_clean_model(self) -> bool:
    """Whether the attack is made on a clean model (the vanilla model trains first)."""
    return self.prepare is not None or self.perturb_poisoned is not None
