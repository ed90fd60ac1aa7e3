"""BppAttack: colour-depth reduction with Floyd-Steinberg dithering as the trigger.

`T(x)`: every pixel, visited row by row, left to right, is quantised per channel to
`squeeze_num` levels, `q(v) = round(v (n - 1)) / (n - 1)`, and its error `v - q(v)` is pushed to
the unvisited neighbours with Floyd-Steinberg's weights (7/16 right, 1/16 down-right, 5/16 down,
3/16 down-left, in that order); the result is clipped to [0, 1].

Follows Wang, Zhai and Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep
Neural Networks via Image Quantization and Contrastive Adversarial Learning", CVPR 2022, as
BackdoorBench runs it (attack/bpp.py, `floydDitherspeed`; config/attack/bpp: squeeze_num 8,
dithering on). What differs: pixels in [0, 1] instead of 0..255 (the same levels); the
dithering is a `lax.scan` over rows and, inside, columns, so it jits and vmaps; BPP's
contrastive adversarial training (negative examples made by an adversarial perturbation during
training) is not part of it: the trigger is poisoned like any other, by `attacks.poison`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from linfjax import settings
from linfjax.attacks.base import Attack, TriggerError
from linfjax.settings import integer, spec

BPP_SQUEEZE_NUM = 8


def dither(image: jax.Array, levels: jax.Array) -> jax.Array:
  """Floyd-Steinberg dithering of one image [H, W, C] float32 to `levels` levels per channel."""
  height, width, channels = image.shape
  steps = jnp.asarray(levels, jnp.float32) - 1.0
  pad = jnp.zeros((1, channels), jnp.float32)

  def pixel(carry, x):
    row, below = carry                     # both [W + 2, C]: column j is at j + 1
    old = row[x + 1]
    new = jnp.round(old * steps) / steps
    error = old - new
    row = row.at[x + 1].set(new).at[x + 2].add(error * 0.4375)
    below = below.at[x + 2].add(error * 0.0625).at[x + 1].add(error * 0.3125)
    below = below.at[x].add(error * 0.1875)
    return (row, below), None

  def line(row, below):
    row = jnp.concatenate([pad, row, pad])
    below = jnp.concatenate([pad, below, pad])
    (row, below), _ = jax.lax.scan(pixel, (row, below), jnp.arange(width))
    return row[1:-1], below[1:-1]

  def step(row, below):
    done, below = line(row, below)
    return below, done

  last, done = jax.lax.scan(step, image[0], image[1:])
  last, _ = line(last, jnp.zeros_like(last))
  return jnp.clip(jnp.concatenate([done, last[None]]), 0.0, 1.0)


class Quantized(NamedTuple):
  """BPP's trigger: `levels` (a float32 scalar, so triggers stack) levels per channel."""
  levels: jax.Array
  shape: jax.Array  # [H, W] zeros, only for the region's shape

  def stamp(self, images: jax.Array) -> jax.Array:
    return jax.vmap(dither, in_axes=(0, None))(images, self.levels)

  def region(self) -> jax.Array:
    return jnp.ones(self.shape.shape[-2:], bool)


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The `trigger` block's fields of BPP."""
  squeeze_num: int = spec(BPP_SQUEEZE_NUM, integer(2).when("kind", "bpp"),
                          "BPP's colour levels per channel (>= 2).")


def bpp(image_shape, *, squeeze_num: int = BPP_SQUEEZE_NUM) -> Quantized:
  """BPP's trigger for images of `image_shape` (H, W, C): `squeeze_num` levels, dithered."""
  if int(squeeze_num) != squeeze_num or squeeze_num < 2:
    raise TriggerError(f"BPP squeeze_num {squeeze_num} must be an integer >= 2")
  height, width = image_shape[:2]
  return Quantized(jnp.float32(squeeze_num), jnp.zeros((height, width), jnp.float32))


BPP = Attack(
    settings=Settings,
    build=lambda values, shape: bpp(shape, squeeze_num=values.squeeze_num),
    description="BPP: colour depth reduced to squeeze_num levels, Floyd-Steinberg dithered",
    preset=dict(kind="bpp", squeeze_num=BPP_SQUEEZE_NUM, clean_label=False, cross_ratio=0.0))
