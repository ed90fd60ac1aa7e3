"""Triggers: pure functions of (parameters, batch) in pixel space.

Every trigger linfjax uses today is a mask-and-pattern pair applied as
`T(x) = (1 - m) * x + m * p`:
  - patch (BadNets): `m` is 1 on a `size x size` square and 0 elsewhere, `p` is
    the patch's pattern (solid colour, checkerboard, or a given array) there;
  - blend: `m = alpha` everywhere, `p` a seeded noise image or a given image;
  - synthetic (Neural Cleanse): `m`, `p` recovered by reverse engineering.
So one function, `apply`, stamps them all, and a stack of triggers is a
`Trigger` with a leading axis that `jax.vmap` maps over.

References:
  Gu et al., "BadNets", 2017. Chen et al., "Targeted Backdoor Attacks on Deep
  Learning Systems Using Data Poisoning" (blend), 2017.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from linfjax import errors, pixels


class TriggerError(errors.UserError, ValueError):
  """A trigger's parameters do not describe a trigger for these images."""


class Trigger(NamedTuple):
  """mask: [H, W, 1] float32 in [0, 1]; pattern: [H, W, C] float32 in [0, 1]."""
  mask: jax.Array
  pattern: jax.Array


def apply(trigger: Trigger, images: jax.Array) -> jax.Array:
  """Stamps a trigger on a batch.

  Args:
    trigger: mask [H, W, 1] and pattern [H, W, C].
    images: [B, H, W, C] float in [0, 1] (`pixels.to_unit_float` converts uint8 pixels; a
      uint8 batch is refused, since a blend mask of 0.2 cast to uint8 is 0).

  Returns:
    [B, H, W, C], `(1 - mask) * images + mask * pattern`, computed in float32 and returned
    in the images' float dtype.
  """
  chex.assert_rank(images, 4)
  chex.assert_equal_shape_suffix([images, trigger.pattern[None]], 3)
  pixels.require_float(images, "triggers.apply")
  mask = jnp.asarray(trigger.mask, jnp.float32)[None]
  pattern = jnp.asarray(trigger.pattern, jnp.float32)[None]
  stamped = (1 - mask) * images.astype(jnp.float32) + mask * pattern
  return stamped.astype(images.dtype)


def region(trigger: Trigger) -> jax.Array:
  """Where a trigger changes the image: [H, W] bool (mask > 0)."""
  return trigger.mask[..., 0] > 0


def patch(image_shape, *, size: int, row: int, col: int, pattern: np.ndarray) -> Trigger:
  """A `size x size` patch with top-left corner at (row, col).

  Args:
    image_shape: (H, W, C).
    size: patch side in pixels.
    row, col: top-left corner of the patch.
    pattern: [size, size, C] (or broadcastable) values in [0, 1].
  """
  height, width, channels = image_shape
  if size < 1 or row < 0 or col < 0 or row + size > height or col + size > width:
    raise TriggerError(f"a {size}x{size} patch at (row {row}, col {col}) does not fit a "
                       f"{height}x{width} image")
  pattern = np.broadcast_to(np.asarray(pattern, np.float32), (size, size, channels))
  _check_unit_interval(pattern, "patch pattern")
  mask = np.zeros((height, width, 1), np.float32)
  mask[row:row + size, col:col + size] = 1.0
  full_pattern = np.zeros((height, width, channels), np.float32)
  full_pattern[row:row + size, col:col + size] = pattern
  return Trigger(jnp.asarray(mask), jnp.asarray(full_pattern))


def blend(image_shape, *, alpha: float, pattern: np.ndarray) -> Trigger:
  """`(1 - alpha) * x + alpha * pattern` over the whole image."""
  height, width, channels = image_shape
  if not 0.0 < alpha <= 1.0:
    raise TriggerError(f"blend alpha {alpha} must be in (0, 1]")
  pattern = np.asarray(pattern, np.float32)
  if pattern.shape != (height, width, channels):
    raise TriggerError(f"blend pattern has shape {pattern.shape}; the images are "
                       f"{(height, width, channels)}")
  _check_unit_interval(pattern, "blend pattern")
  mask = np.full((height, width, 1), alpha, np.float32)
  return Trigger(jnp.asarray(mask), jnp.asarray(pattern))


def solid_pattern(size: int, color) -> np.ndarray:
  return np.broadcast_to(np.asarray(color, np.float32), (size, size, len(color))).copy()


def checkerboard_pattern(size: int, color) -> np.ndarray:
  """Alternates `color` and black, starting with `color` at the top-left pixel."""
  on = (np.add.outer(np.arange(size), np.arange(size)) % 2 == 0)[..., None]
  return np.where(on, np.asarray(color, np.float32), 0.0).astype(np.float32)


def noise_pattern(image_shape, seed: int) -> np.ndarray:
  """Uniform noise in [0, 1], fixed by `seed`."""
  return np.asarray(jax.random.uniform(jax.random.key(seed), tuple(image_shape)), np.float32)


def load_pattern_file(path: str) -> np.ndarray:
  """Reads a pattern from .npy (values in [0, 1]) or an image file (scaled to [0, 1])."""
  if not os.path.exists(path):
    raise TriggerError(f"{path}: trigger pattern file not found")
  if path.endswith(".npy"):
    try:
      array = np.load(path, allow_pickle=False)
    except Exception as e:
      raise TriggerError(f"{path}: not a readable .npy array ({e})") from None
    array = np.asarray(array, np.float32)
  else:
    from PIL import Image
    try:
      with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), np.float32) / 255.0
    except Exception as e:
      raise TriggerError(f"{path}: not a readable image ({e})") from None
  if array.ndim == 2:
    array = array[..., None]
  return array


def _check_unit_interval(array: np.ndarray, what: str) -> None:
  if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
    raise TriggerError(f"{what} must hold values in [0, 1] (found {array.min()}..{array.max()})")


PATCH_CORNERS = {
    "top_left": lambda h, w, s: (0, 0),
    "top_right": lambda h, w, s: (0, w - s),
    "bottom_left": lambda h, w, s: (h - s, 0),
    "bottom_right": lambda h, w, s: (h - s, w - s),
}


def _patch_from_config(trigger_config, image_shape) -> Trigger:
  height, width, channels = image_shape
  size = trigger_config.size
  color = tuple(trigger_config.color)
  if len(color) == 1:
    color = color * channels
  if trigger_config.position == "offset":
    row, col = trigger_config.offset
  else:
    row, col = PATCH_CORNERS[trigger_config.position](height, width, size)
  if trigger_config.pattern == "solid":
    pattern = solid_pattern(size, color)
  elif trigger_config.pattern == "checkerboard":
    pattern = checkerboard_pattern(size, color)
  else:
    pattern = load_pattern_file(trigger_config.pattern_file)
    if pattern.shape[:2] != (size, size):
      raise TriggerError(f"{trigger_config.pattern_file}: pattern is {pattern.shape[:2]}, "
                         f"the patch is {size}x{size}")
  return patch(image_shape, size=size, row=row, col=col, pattern=pattern)


def _blend_from_config(trigger_config, image_shape) -> Trigger:
  if trigger_config.pattern == "noise":
    pattern = noise_pattern(image_shape, trigger_config.noise_seed)
  else:
    pattern = load_pattern_file(trigger_config.pattern_file)
  return blend(image_shape, alpha=trigger_config.alpha, pattern=pattern)


TRIGGERS = {
    "patch": _patch_from_config,
    "blend": _blend_from_config,
}


def from_config(trigger_config, image_shape) -> Trigger:
  """Builds the trigger a config's `trigger` block describes, for images of `image_shape`."""
  if trigger_config.kind not in TRIGGERS:
    raise TriggerError(f"unknown trigger kind {trigger_config.kind!r}; known: "
                       f"{', '.join(TRIGGERS)}")
  return TRIGGERS[trigger_config.kind](trigger_config, tuple(image_shape))
