"""Attacks: triggers as pure functions of a batch, and poisoning a training set.

    trigger = attacks.from_config(config.trigger, image_shape)   # a pytree of arrays
    stamped = attacks.apply(trigger, images)                     # [B, H, W, C] in [0, 1]

`ATTACKS` lists every attack by the name a config's `trigger.kind` (and a grid axis
`trigger=NAME`) uses; each is one module exposing an `Attack` entry (linfjax/attacks/base.py):
its settings, how it builds its trigger and checks them, and its preset. A new attack is one
module, one line here and its test.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from linfjax import settings
from linfjax.attacks import bpp, ftrojan, inputaware, lc, lf, mask_pattern, sig, trojannn, wanet
from linfjax.attacks.base import (Attack, CleanModel, TriggerError, TriggerLike, apply,
                                  apply_noise_mode, region)
from linfjax.attacks.bpp import Quantized
from linfjax.attacks.ftrojan import Frequency
from linfjax.attacks.inputaware import InputAware
from linfjax.attacks.mask_pattern import (Trigger, blend, checkerboard_pattern, noise_pattern,
                                          patch, solid_pattern)
from linfjax.attacks.sig import Signal
from linfjax.attacks.wanet import Warp
from linfjax.settings import boolean, choice, fail, spec

ATTACKS: dict[str, Attack] = {
    "patch": mask_pattern.PATCH,
    "blend": mask_pattern.BLEND,
    "sig": sig.SIG,
    "wanet": wanet.WANET,
    "bpp": bpp.BPP,
    "ftrojan": ftrojan.FTROJAN,
    "trojannn": trojannn.TROJANNN,
    "lc": lc.LC,
    "lf": lf.LF,
    "inputaware": inputaware.INPUTAWARE,
}
# What `trigger=NAME` sets in a grid, and what configs/cifar_<NAME>.py use.
PRESETS = {name: attack.preset for name, attack in ATTACKS.items()}
AnyTrigger = Trigger | Signal | Warp | Quantized | Frequency | InputAware


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The fields of the `trigger` block every attack shares."""
  kind: str = spec("patch", choice(*ATTACKS), "The attack (linfjax/attacks/).")
  clean_label: bool = spec(False, boolean(),
                           "Clean-label poisoning: poison only target-class images and keep "
                           "their labels (SIG as published); False relabels non-target images "
                           "to the attack's label.")


def owners() -> tuple[type[settings.Settings], ...]:
  """The settings classes whose fields make up the `trigger` block, each once."""
  return (Settings, *dict.fromkeys(attack.settings for attack in ATTACKS.values()))


def trigger_block():
  """The `trigger` block with every attack's defaults (kind 'patch')."""
  return settings.block(*owners())


def check(trigger_block_, poison_mode: str | None) -> None:
  """Checks the `trigger` block without data: ConfigError naming the field.

  `poison_mode` is the `poison` block's mode, which clean-label poisoning must agree with;
  None checks the trigger alone (a trigger built outside a run's config).
  """
  Settings.check_block(trigger_block_, "trigger")
  attack = ATTACKS[trigger_block_.kind]
  shared = {owner for owner in owners() if owner is not Settings}
  for owner in shared:
    owner.check_block(trigger_block_, "trigger")
  attack.check(attack.settings.from_config(trigger_block_), "trigger")
  if trigger_block_.clean_label and poison_mode not in (None, "all_to_one"):
    fail("trigger.clean_label", f"clean-label poisoning keeps the labels, so it needs "
         f"poison.mode='all_to_one' (got {poison_mode!r}); set trigger.clean_label=False for "
         "all-to-all")
  if trigger_block_.cross_ratio and not attack.has_noise_mode:
    with_one = ", ".join(name for name, entry in ATTACKS.items() if entry.has_noise_mode)
    fail("trigger.cross_ratio", f"{trigger_block_.cross_ratio!r}: the {trigger_block_.kind!r} "
         f"trigger has no noise mode (only {with_one} have one); set it to 0")


def check_data(trigger_block_, image_shape) -> None:
  """Checks that the trigger fits images of `image_shape` (H, W, C)."""
  attack = ATTACKS[trigger_block_.kind]
  attack.check_data(attack.settings.from_config(trigger_block_), tuple(image_shape))


def from_config(trigger_block_, image_shape) -> Any:
  """Builds the trigger a config's `trigger` block describes, for images of `image_shape`."""
  if trigger_block_.kind not in ATTACKS:
    raise TriggerError(f"unknown trigger kind {trigger_block_.kind!r}; known: "
                       f"{', '.join(ATTACKS)}")
  attack = ATTACKS[trigger_block_.kind]
  return attack.build(attack.settings.from_config(trigger_block_), tuple(image_shape))


def needs_clean_model(trigger_block_) -> bool:
  """Whether the attack is made on a clean model, so a run trains its vanilla model first."""
  return ATTACKS[trigger_block_.kind].needs_clean_model


def prepare(trigger_block_, trigger: Any, clean_model: CleanModel) -> tuple[Any, Any]:
  """The attack made on `clean_model`: (its trigger, and its `perturb_poisoned` function of
  (uint8 images, labels) -> uint8 images, or None)."""
  attack = ATTACKS[trigger_block_.kind]
  values = attack.settings.from_config(trigger_block_)
  if attack.prepare is not None:
    trigger = attack.prepare(values, trigger, clean_model)
  perturb = None
  if attack.perturb_poisoned is not None:
    perturb = lambda images, labels: attack.perturb_poisoned(values, clean_model, images, labels)
  return trigger, perturb


def has_region(trigger_block_) -> bool:
  """Whether the attack's trigger leaves part of the image untouched (trigger recovery)."""
  return ATTACKS[trigger_block_.kind].has_region


__all__ = [
    "ATTACKS", "AnyTrigger", "Attack", "CleanModel", "Frequency", "InputAware", "Quantized", "PRESETS", "Settings", "Signal", "Trigger", "TriggerError",
    "TriggerLike", "Warp", "apply", "apply_noise_mode", "blend", "check", "check_data",
    "checkerboard_pattern", "from_config", "has_region", "needs_clean_model", "noise_pattern",
    "patch", "prepare", "region",
    "solid_pattern", "trigger_block",
]
