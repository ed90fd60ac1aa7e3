"""FTrojan: a fixed bump at two frequencies of the colour channels' block DCT.

`T(x)`: RGB to YUV, each `window x window` block of U and V to its orthonormal 2-D DCT-II,
`magnitude` added at positions (window/2 - 1, window/2 - 1) and (window - 1, window - 1) (a
mid and a high frequency), the inverse DCT, back to RGB, clipped to [0, 1].

Follows Wang, Ma, Zhou et al., "An Invisible Black-box Backdoor Attack through Frequency
Domain", ECCV 2022, as BackdoorBench runs it (attack/ftrojan.py and its utilities;
config/attack/ftrojan: YUV, channels U and V, window 32, positions (15, 15) and (31, 31),
magnitude 30 of 255). What differs: pixels in [0, 1], so the magnitude is 30/255 (the DCT is
linear, so this is the same trigger); the YUV matrix is the analog BT.601 one of the FTrojan
paper; the DCT is a matrix product (jittable, vmappable); positions follow the window size for
windows other than 32.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from linfjax import settings
from linfjax.attacks.base import Attack, TriggerError
from linfjax.settings import fail, integer, number, spec

FTROJAN_MAGNITUDE = 30 / 255
FTROJAN_WINDOW = 32
RGB_TO_YUV = np.array([[0.299, 0.587, 0.114],
                       [-0.14713, -0.28886, 0.436],
                       [0.615, -0.51499, -0.10001]], np.float64)


def dct_matrix(size: int) -> np.ndarray:
  """The orthonormal DCT-II matrix D: `D @ x` is scipy.fft.dct(x, norm='ortho')."""
  k, n = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  matrix = np.cos(np.pi * (2 * n + 1) * k / (2 * size)) * np.sqrt(2.0 / size)
  matrix[0] /= np.sqrt(2.0)
  return matrix


def positions(window: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """The two frequencies FTrojan marks: (15, 15) and (31, 31) for a window of 32."""
  return (window // 2 - 1, window // 2 - 1), (window - 1, window - 1)


class Frequency(NamedTuple):
  """FTrojan's trigger: `dct` [w, w], `bump` [w, w, 3] added to the YUV blocks' DCT,
  `to_yuv` [3, 3], `canvas` [H, W] zeros (the region's shape)."""
  dct: jnp.ndarray
  bump: jnp.ndarray
  to_yuv: jnp.ndarray
  canvas: jnp.ndarray

  def stamp(self, images):
    batch, height, width, channels = images.shape
    window = self.dct.shape[-1]
    yuv = jnp.einsum("bhwc,dc->bhwd", images, self.to_yuv)
    blocks = yuv.reshape(batch, height // window, window, width // window, window, channels)
    coefficients = jnp.einsum("ki,bpiqjc,lj->bpkqlc", self.dct, blocks, self.dct)
    coefficients = coefficients + self.bump[None, None, :, None, :, :]
    blocks = jnp.einsum("ki,bpkqlc,lj->bpiqjc", self.dct, coefficients, self.dct)
    yuv = blocks.reshape(batch, height, width, channels)
    rgb = jnp.einsum("bhwd,cd->bhwc", yuv, jnp.linalg.inv(self.to_yuv))
    return jnp.clip(rgb, 0.0, 1.0)

  def region(self):
    """The whole image (each block's frequencies spread over all of it)."""
    return jnp.ones(self.canvas.shape[-2:], bool)


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The `trigger` block's fields of FTrojan."""
  magnitude: float = spec(FTROJAN_MAGNITUDE,
                          number(0.0, 10.0, low_open=True).when("kind", "ftrojan"),
                          "FTrojan's added DCT coefficient, in [0, 1] pixel units (30/255).")
  window: int = spec(FTROJAN_WINDOW, integer(2).when("kind", "ftrojan"),
                     "FTrojan's DCT block size; it must divide the image's height and width.")


def ftrojan(image_shape, *, magnitude: float = FTROJAN_MAGNITUDE,
            window: int = FTROJAN_WINDOW) -> Frequency:
  """FTrojan's trigger for RGB images of `image_shape` (H, W, 3)."""
  height, width, channels = image_shape
  if channels != 3:
    raise TriggerError(f"FTrojan works on RGB images (3 channels), not {channels}")
  if window < 2 or height % window or width % window:
    raise TriggerError(f"FTrojan window {window} must divide the image size {height}x{width}")
  if not magnitude > 0.0:
    raise TriggerError(f"FTrojan magnitude {magnitude} must be positive")
  bump = np.zeros((window, window, 3), np.float32)
  for row, col in positions(window):
    bump[row, col, 1:] = magnitude
  return Frequency(jnp.asarray(dct_matrix(window), jnp.float32), jnp.asarray(bump),
                   jnp.asarray(RGB_TO_YUV, jnp.float32),
                   jnp.zeros((height, width), jnp.float32))


def _check_data(values, shape) -> None:
  if shape[2] != 3:
    fail("trigger.kind", f"'ftrojan' works on RGB images, not {shape[2]} channels")
  if shape[0] % values.window or shape[1] % values.window:
    fail("trigger.window", f"{values.window} must divide the image size {shape[0]}x{shape[1]}")


FTROJAN = Attack(
    settings=Settings,
    build=lambda values, shape: ftrojan(shape, magnitude=values.magnitude, window=values.window),
    check_data=_check_data,
    description="FTrojan: a bump at a mid and a high frequency of the UV channels' block DCT",
    preset=dict(kind="ftrojan", magnitude=FTROJAN_MAGNITUDE, window=FTROJAN_WINDOW,
                clean_label=False, cross_ratio=0.0))
