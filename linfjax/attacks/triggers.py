"""Triggers: pure functions of (parameters, batch) in pixel space.

Three kinds of trigger, each a NamedTuple of arrays (a pytree), so a stack of triggers
of one kind has a leading axis that `jax.vmap` maps over:
  - `Trigger(mask, pattern)`, applied as `T(x) = (1 - m) * x + m * p`:
      patch (BadNets): `m` is 1 on a `size x size` square and 0 elsewhere, `p` the
      patch's pattern (solid colour, checkerboard, or a given array) there;
      blend: `m = alpha` everywhere, `p` a seeded noise image or a given image;
      synthetic (Neural Cleanse): `m`, `p` recovered by reverse engineering;
  - `Signal(signal)`, added and clipped, `T(x) = clip(x + v, 0, 1)`: SIG's horizontal
    sinusoid `v(i, j) = delta * sin(2 pi j f / W)`;
  - `Warp(grid)`, a resampling `T(x) = sample(x, grid)`: WaNet's smooth warping field
    (linfjax/attacks/warp.py), a function of the image rather than a mask and a pattern.
`apply` and `region` dispatch on the kind (a pytree's type is static under `jit`, so
each kind compiles to its own code); every caller uses them and never looks inside.
`apply_noise_mode` is WaNet's noise mode (the warp jittered by fresh random noise);
the other kinds have none.

References:
  Gu et al., "BadNets", 2017. Chen et al., "Targeted Backdoor Attacks on Deep
  Learning Systems Using Data Poisoning" (blend), 2017. Barni, Kallas and Tondi, "A
  new Backdoor Attack in CNNs by training set corruption without label poisoning"
  (SIG), ICIP 2019. Nguyen and Tran, "WaNet - Imperceptible Warping-based Backdoor
  Attack", ICLR 2021.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from linfjax import errors, pixels
from linfjax.attacks import warp

# SIG's published defaults as BackdoorBench runs them (config/attack/sig/default.yaml):
# amplitude delta = 40 of 255 grey levels, frequency f = 6 periods across the width.
SIG_AMPLITUDE = 40 / 255
SIG_FREQUENCY = 6.0
# WaNet's published defaults (its code and BackdoorBench's config/attack/wanet): control
# grid k = 4, strength s = 0.5, grid_rescale 1, and cross_ratio 2 noise-mode examples per
# poisoned one.
WANET_GRID_SIZE = 4
WANET_STRENGTH = 0.5
WANET_GRID_RESCALE = 1.0
WANET_CROSS_RATIO = 2.0



class TriggerError(errors.UserError, ValueError):
  """A trigger's parameters do not describe a trigger for these images."""


class Trigger(NamedTuple):
  """A mask-and-pattern trigger (patch, blend, synthetic).

  mask: [H, W, 1] float32 in [0, 1]; pattern: [H, W, C] float32 in [0, 1].
  """
  mask: jax.Array
  pattern: jax.Array


class Signal(NamedTuple):
  """An additive trigger (SIG): signal [H, W, C] float32, added and clipped to [0, 1]."""
  signal: jax.Array


class Warp(NamedTuple):
  """A warping trigger (WaNet): grid [H, W, 2] float32, where each pixel reads (x, y) in
  [-1, 1] (linfjax/attacks/warp.py)."""
  grid: jax.Array


AnyTrigger = Trigger | Signal | Warp


def apply(trigger: AnyTrigger, images: jax.Array) -> jax.Array:
  """Stamps a trigger on a batch.

  Args:
    trigger: a Trigger, Signal or Warp for images of this size.
    images: [B, H, W, C] float in [0, 1] (`pixels.to_unit_float` converts uint8 pixels; a
      uint8 batch is refused, since a blend mask of 0.2 cast to uint8 is 0).

  Returns:
    [B, H, W, C]: `(1 - mask) * x + mask * pattern` (Trigger), `clip(x + signal, 0, 1)`
    (Signal), or `x` resampled at the warp's grid (Warp), computed in float32 and
    returned in the images' dtype.
  """
  chex.assert_rank(images, 4)
  pixels.require_float(images, "triggers.apply")
  x = images.astype(jnp.float32)
  if isinstance(trigger, Trigger):
    chex.assert_equal_shape_suffix([images, trigger.pattern[None]], 3)
    mask = jnp.asarray(trigger.mask, jnp.float32)[None]
    stamped = (1 - mask) * x + mask * jnp.asarray(trigger.pattern, jnp.float32)[None]
  elif isinstance(trigger, Signal):
    chex.assert_equal_shape_suffix([images, trigger.signal[None]], 3)
    stamped = jnp.clip(x + jnp.asarray(trigger.signal, jnp.float32)[None], 0, 1)
  elif isinstance(trigger, Warp):
    chex.assert_shape(trigger.grid, (*images.shape[1:3], 2))
    stamped = warp.grid_sample(x, trigger.grid)
  else:
    raise TypeError(f"not a trigger: {type(trigger).__name__}")
  return stamped.astype(images.dtype)


def apply_noise_mode(trigger: AnyTrigger, images: jax.Array, key: jax.Array) -> jax.Array:
  """WaNet's noise mode: the warp's grid plus fresh uniform noise in [-1/H, 1/H] per image.

  Noise-mode examples keep their true label, so the model learns that only the exact
  warp is the trigger. The other kinds have no noise mode: their images come back as
  they are.

  Args:
    trigger: any trigger.
    images: [B, H, W, C] float in [0, 1].
    key: PRNG key for the noise.

  Returns:
    [B, H, W, C] in the images' dtype.
  """
  if not isinstance(trigger, Warp):
    return images
  batch, height = images.shape[0], images.shape[1]
  noise = jax.random.uniform(key, (batch, *trigger.grid.shape), minval=-1.0, maxval=1.0)
  grids = jnp.clip(trigger.grid[None] + noise / height, -1.0, 1.0)
  return warp.grid_sample(images, grids).astype(images.dtype)


def region(trigger: AnyTrigger) -> jax.Array:
  """Where a trigger changes the image: [H, W] bool.

  A Trigger's region is where its mask is positive (a patch's square; everywhere for a
  blend). SIG's sinusoid and WaNet's warp act on the whole image, so their region is the
  whole image (ours: a warp moves every pixel a little, and a sinusoid's zeros are columns
  of one pixel, not a place the trigger avoids).
  """
  if isinstance(trigger, Trigger):
    return trigger.mask[..., 0] > 0
  if isinstance(trigger, Signal):
    return jnp.ones(trigger.signal.shape[:2], bool)
  if isinstance(trigger, Warp):
    return jnp.ones(trigger.grid.shape[:2], bool)
  raise TypeError(f"not a trigger: {type(trigger).__name__}")


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


def sig(image_shape, *, amplitude: float = SIG_AMPLITUDE,
        frequency: float = SIG_FREQUENCY) -> Signal:
  """SIG's horizontal sinusoid `v(i, j) = amplitude * sin(2 pi j frequency / W)`, all channels.

  Args:
    image_shape: (H, W, C).
    amplitude: delta, in [0, 1] pixel units (SIG_AMPLITUDE = 40 / 255).
    frequency: f, periods across the image width (SIG_FREQUENCY = 6).
  """
  height, width, channels = image_shape
  if not 0.0 < amplitude <= 1.0:
    raise TriggerError(f"SIG amplitude {amplitude} must be in (0, 1] (pixel units)")
  if not frequency > 0.0:
    raise TriggerError(f"SIG frequency {frequency} must be positive")
  row = amplitude * np.sin(2 * np.pi * np.arange(width) * frequency / width)
  signal = np.broadcast_to(row[None, :, None], (height, width, channels)).astype(np.float32)
  return Signal(jnp.asarray(signal))


def wanet(image_shape, *, grid_size: int = WANET_GRID_SIZE, strength: float = WANET_STRENGTH,
          seed: int = 0, grid_rescale: float = WANET_GRID_RESCALE) -> Warp:
  """WaNet's warp from a seeded `grid_size x grid_size` control grid (linfjax/attacks/warp.py)."""
  height, width = image_shape[:2]
  if not 2 <= grid_size <= min(height, width):
    raise TriggerError(f"WaNet grid size {grid_size} must be in [2, {min(height, width)}] for "
                       f"a {height}x{width} image")
  if not strength > 0.0 or not grid_rescale > 0.0:
    raise TriggerError(f"WaNet strength {strength} and grid_rescale {grid_rescale} must be "
                       "positive")
  return Warp(jnp.asarray(warp.wanet_grid(image_shape, grid_size=grid_size, strength=strength,
                                          seed=seed, grid_rescale=grid_rescale)))


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


def _sig_from_config(trigger_config, image_shape) -> Signal:
  return sig(image_shape, amplitude=trigger_config.amplitude, frequency=trigger_config.frequency)


def _wanet_from_config(trigger_config, image_shape) -> Warp:
  return wanet(image_shape, grid_size=trigger_config.grid_size, strength=trigger_config.strength,
               seed=trigger_config.warp_seed, grid_rescale=trigger_config.grid_rescale)


TRIGGERS = {
    "patch": _patch_from_config,
    "blend": _blend_from_config,
    "sig": _sig_from_config,
    "wanet": _wanet_from_config,
}


def from_config(trigger_config, image_shape) -> AnyTrigger:
  """Builds the trigger a config's `trigger` block describes, for images of `image_shape`."""
  if trigger_config.kind not in TRIGGERS:
    raise TriggerError(f"unknown trigger kind {trigger_config.kind!r}; known: "
                       f"{', '.join(TRIGGERS)}")
  return TRIGGERS[trigger_config.kind](trigger_config, tuple(image_shape))
