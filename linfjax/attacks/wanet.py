"""WaNet: a smooth, seeded warp of the whole image, with its noise mode.

The trigger resamples the image at a displaced grid (linfjax/attacks/warp.py); the noise mode
trains `cross_ratio * P` more examples warped with fresh random noise and their true labels,
so the model learns that only the exact warp is the trigger.

References:
  Nguyen and Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from linfjax import settings
from linfjax.attacks import warp
from linfjax.attacks.base import Attack, TriggerError
from linfjax.settings import fail, integer, number, spec

# WaNet's published defaults (its code and BackdoorBench's config/attack/wanet): control
# grid k = 4, strength s = 0.5, grid_rescale 1, and cross_ratio 2 noise-mode examples per
# poisoned one.
WANET_GRID_SIZE = 4
WANET_STRENGTH = 0.5
WANET_GRID_RESCALE = 1.0
WANET_CROSS_RATIO = 2.0


class Warp(NamedTuple):
  """A warping trigger: grid [H, W, 2] float32, where each pixel reads (x, y) in [-1, 1]."""
  grid: jax.Array

  def stamp(self, images: jax.Array) -> jax.Array:
    chex.assert_shape(self.grid, (*images.shape[1:3], 2))
    return warp.grid_sample(images, self.grid)

  def region(self) -> jax.Array:
    """The whole image: a warp moves every pixel a little."""
    return jnp.ones(self.grid.shape[:2], bool)

  def noise_mode(self, images: jax.Array, key: jax.Array) -> jax.Array:
    """The warp's grid plus fresh uniform noise in [-1/H, 1/H] per image."""
    batch, height = images.shape[0], images.shape[1]
    noise = jax.random.uniform(key, (batch, *self.grid.shape), minval=-1.0, maxval=1.0)
    grids = jnp.clip(self.grid[None] + noise / height, -1.0, 1.0)
    return warp.grid_sample(images, grids)


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The `trigger` block's fields of WaNet."""
  grid_size: int = spec(WANET_GRID_SIZE, integer(2).when("kind", "wanet"),
                        "WaNet's control grid side k.")
  strength: float = spec(WANET_STRENGTH, number(0.0, 100.0, low_open=True).when("kind", "wanet"),
                         "WaNet's warp strength s.")
  grid_rescale: float = spec(WANET_GRID_RESCALE,
                             number(0.0, 10.0, low_open=True).when("kind", "wanet"),
                             "WaNet's grid_rescale.")
  warp_seed: int = spec(0, integer(0).when("kind", "wanet"), "Seed of WaNet's control grid.")
  cross_ratio: float = spec(0.0, number(0.0, 100.0),
                            "The noise mode: round(cross_ratio * P) more examples (P poisoned "
                            "ones) keep their true labels and are, in every step, warped with "
                            "fresh noise (wanet) or stamped with another image's pattern "
                            "(inputaware); 0 turns it off (only those kinds have one).")


def wanet(image_shape, *, grid_size: int = WANET_GRID_SIZE, strength: float = WANET_STRENGTH,
          seed: int = 0, grid_rescale: float = WANET_GRID_RESCALE) -> Warp:
  """WaNet's warp from a seeded `grid_size x grid_size` control grid."""
  height, width = image_shape[:2]
  if not 2 <= grid_size <= min(height, width):
    raise TriggerError(f"WaNet grid size {grid_size} must be in [2, {min(height, width)}] for "
                       f"a {height}x{width} image")
  if not strength > 0.0 or not grid_rescale > 0.0:
    raise TriggerError(f"WaNet strength {strength} and grid_rescale {grid_rescale} must be "
                       "positive")
  return Warp(jnp.asarray(warp.wanet_grid(image_shape, grid_size=grid_size, strength=strength,
                                          seed=seed, grid_rescale=grid_rescale)))


def _check_data(values: Settings, image_shape) -> None:
  height, width = image_shape[:2]
  if values.grid_size > min(height, width):
    fail("trigger.grid_size", f"{values.grid_size} is larger than the {height}x{width} image")


WANET = Attack(
    settings=Settings, check_data=_check_data, has_noise_mode=True,
    build=lambda values, shape: wanet(shape, grid_size=values.grid_size,
                                      strength=values.strength, seed=values.warp_seed,
                                      grid_rescale=values.grid_rescale),
    description="WaNet: a smooth seeded warp of the whole image, with a noise mode",
    # k 4, s 0.5, grid_rescale 1, noise mode with cross_ratio 2 (its published defaults).
    preset=dict(kind="wanet", grid_size=WANET_GRID_SIZE, strength=WANET_STRENGTH,
                grid_rescale=WANET_GRID_RESCALE, warp_seed=0, clean_label=False,
                cross_ratio=WANET_CROSS_RATIO))
