"""Mask-and-pattern triggers: BadNets' patch and the blend, `T(x) = (1 - m) * x + m * p`.

  - patch (BadNets): `m` is 1 on a `size x size` square and 0 elsewhere, `p` the patch's
    pattern (solid colour, checkerboard, or a given array) there;
  - blend: `m = alpha` everywhere, `p` a seeded noise image or a given image.
Neural Cleanse's synthetic triggers are of this kind too (`m`, `p` recovered by reverse
engineering), so a recovered trigger is an ordinary `Trigger`.

References:
  Gu et al., "BadNets", 2017. Chen et al., "Targeted Backdoor Attacks on Deep Learning
  Systems Using Data Poisoning" (blend), 2017.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from linfjax import settings
from linfjax.attacks.base import Attack, TriggerError, check_unit_interval
from linfjax.settings import choice, described, fail, integer, number, spec


class Trigger(NamedTuple):
  """A mask-and-pattern trigger: mask [H, W, 1] and pattern [H, W, C], float32 in [0, 1]."""
  mask: jax.Array
  pattern: jax.Array

  def stamp(self, images: jax.Array) -> jax.Array:
    chex.assert_equal_shape_suffix([images, self.pattern[None]], 3)
    mask = jnp.asarray(self.mask, jnp.float32)[None]
    return (1 - mask) * images + mask * jnp.asarray(self.pattern, jnp.float32)[None]

  def region(self) -> jax.Array:
    """Where the mask is positive: a patch's square; everywhere for a blend."""
    return self.mask[..., 0] > 0


PATCH_PATTERNS = ("solid", "checkerboard", "file")
BLEND_PATTERNS = ("noise", "file")
PATCH_CORNERS = {
    "top_left": lambda h, w, s: (0, 0),
    "top_right": lambda h, w, s: (0, w - s),
    "bottom_left": lambda h, w, s: (h - s, 0),
    "bottom_right": lambda h, w, s: (h - s, w - s),
}
PATCH_POSITIONS = (*PATCH_CORNERS, "offset")


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The `trigger` block's fields of the patch and the blend."""
  size: int = spec(3, integer(1).when("kind", "patch"), "Patch side in pixels.")
  position: str = spec("bottom_right", choice(*PATCH_POSITIONS).when("kind", "patch"),
                       "Where the patch sits.")
  offset: tuple = spec((0, 0), described("two integers >= 0, (row, col)"),
                       "(row, col) of the patch's top-left when position='offset'.")
  pattern: str = spec("solid", described(f"patch: one of {', '.join(map(repr, PATCH_PATTERNS))}; "
                                         f"blend: one of {', '.join(map(repr, BLEND_PATTERNS))}"),
                      "The patch's or the blend's pattern.")
  color: tuple = spec((1.0, 1.0, 1.0), described("values in [0, 1], one per image channel "
                                                 "(or one for all)"),
                      "Solid / checkerboard colour, in [0, 1].")
  pattern_file: str = spec("", described("a .npy array or image file; needed when "
                                         "pattern='file'"), ".npy (or image) pattern when "
                           "pattern='file'.")
  alpha: float = spec(0.2, number(0.0, 1.0, low_open=True).when("kind", "blend"),
                      "Blend weight (BackdoorBench's blended default).")
  noise_seed: int = spec(0, integer(0).when("kind", "blend"), "Seed of the blend noise pattern.")


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
  check_unit_interval(pattern, "patch pattern")
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
  check_unit_interval(pattern, "blend pattern")
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


def _corner(values: Settings, image_shape) -> tuple[int, int]:
  height, width, _ = image_shape
  if values.position == "offset":
    return tuple(values.offset)
  return PATCH_CORNERS[values.position](height, width, values.size)


def _build_patch(values: Settings, image_shape) -> Trigger:
  channels = image_shape[2]
  color = tuple(values.color)
  color = color * channels if len(color) == 1 else color
  if values.pattern == "solid":
    pattern = solid_pattern(values.size, color)
  elif values.pattern == "checkerboard":
    pattern = checkerboard_pattern(values.size, color)
  else:
    pattern = load_pattern_file(values.pattern_file)
    if pattern.shape[:2] != (values.size, values.size):
      raise TriggerError(f"{values.pattern_file}: pattern is {pattern.shape[:2]}, the patch is "
                         f"{values.size}x{values.size}")
  row, col = _corner(values, image_shape)
  return patch(image_shape, size=values.size, row=row, col=col, pattern=pattern)


def _build_blend(values: Settings, image_shape) -> Trigger:
  pattern = (noise_pattern(image_shape, values.noise_seed) if values.pattern == "noise" else
             load_pattern_file(values.pattern_file))
  return blend(image_shape, alpha=values.alpha, pattern=pattern)


def _check_pattern(values: Settings, prefix: str, allowed) -> None:
  problem = choice(*allowed).problem(values.pattern)
  if problem:
    fail(f"{prefix}.pattern", problem)
  if values.pattern == "file" and not values.pattern_file:
    fail(f"{prefix}.pattern_file", "is empty; pattern='file' needs a .npy or image file")


def _check_patch(values: Settings, prefix: str) -> None:
  _check_pattern(values, prefix, PATCH_PATTERNS)
  offset = tuple(values.offset)
  if len(offset) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                 for v in offset):
    fail(f"{prefix}.offset", f"must be two integers >= 0 (row, col), got {offset!r}")
  color = tuple(values.color)
  if not color or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                          and 0.0 <= v <= 1.0 for v in color):
    fail(f"{prefix}.color", f"must be values in [0, 1], one per channel, got {color!r}")


def _check_patch_data(values: Settings, image_shape) -> None:
  height, width, channels = image_shape
  if len(tuple(values.color)) not in (1, channels):
    fail("trigger.color", f"has {len(tuple(values.color))} values; the images have {channels} "
         "channels")
  row, col = tuple(values.offset) if values.position == "offset" else (0, 0)
  if row + values.size > height or col + values.size > width:
    fail("trigger", f"a {values.size}x{values.size} patch at {values.position} (offset "
         f"{(row, col)}) does not fit a {height}x{width} image")


def _check_blend(values: Settings, prefix: str) -> None:
  _check_pattern(values, prefix, BLEND_PATTERNS)


PATCH = Attack(
    settings=Settings, build=_build_patch, check=_check_patch, check_data=_check_patch_data,
    has_region=True, description="BadNets: a small patch stamped at a fixed place",
    # A 3x3 white patch at the bottom-right corner.
    preset=dict(kind="patch", size=3, position="bottom_right", pattern="solid",
                color=(1.0, 1.0, 1.0), clean_label=False, cross_ratio=0.0))
BLEND = Attack(
    settings=Settings, build=_build_blend, check=_check_blend,
    description="Blend: a fixed image mixed into the whole input with weight alpha",
    # Seeded uniform noise mixed in with alpha 0.2 (BackdoorBench's blended default).
    preset=dict(kind="blend", pattern="noise", alpha=0.2, noise_seed=0, clean_label=False,
                cross_ratio=0.0))
