"""Image warping for the WaNet trigger: a smooth field from a seeded control grid, and sampling.

WaNet (Nguyen and Tran, 2021) draws a `k x k` control grid of random displacements,
upsamples it to the image size with bicubic interpolation, and resamples the image at
the displaced positions with bilinear interpolation. The two operations follow
PyTorch's `F.interpolate(mode="bicubic", align_corners=True)` and
`F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=True)`, which the
published code uses, so a field drawn here means what it means there:
  - a grid holds, per output pixel, the (x, y) position to read in normalised
    coordinates, -1 the first pixel's centre and +1 the last's;
  - bicubic weights use Keys' kernel with a = -0.75 and clamp indices at the border.

`wanet_grid` is built once on the host (NumPy); `grid_sample` runs in JAX inside the
training step.

References:
  Nguyen and Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021.
  Keys, "Cubic convolution interpolation for digital image processing", 1981.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

# Keys' cubic convolution parameter in PyTorch's bicubic interpolation.
BICUBIC_A = -0.75


def _keys_near(x: np.ndarray) -> np.ndarray:
  """Keys' kernel for |x| <= 1."""
  a = BICUBIC_A
  return ((a + 2) * x - (a + 3)) * x * x + 1


def _keys_far(x: np.ndarray) -> np.ndarray:
  """Keys' kernel for 1 < |x| < 2."""
  a = BICUBIC_A
  return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] weights of 1-D bicubic upsampling with aligned corners.

  Output sample `o` reads input position `o * (in_size - 1) / (out_size - 1)`; its four
  neighbours' indices are clamped to the input, so border weights pile up there.
  """
  if in_size < 2 or out_size < 2:
    raise ValueError(f"bicubic upsampling needs sizes >= 2, got {in_size} -> {out_size}")
  source = np.arange(out_size, dtype=np.float64) * (in_size - 1) / (out_size - 1)
  base = np.floor(source).astype(np.int64)
  t = source - base
  weights = np.stack([_keys_far(t + 1), _keys_near(t), _keys_near(1 - t), _keys_far(2 - t)], 1)
  matrix = np.zeros((out_size, in_size), np.float64)
  for offset in range(4):
    columns = np.clip(base - 1 + offset, 0, in_size - 1)
    np.add.at(matrix, (np.arange(out_size), columns), weights[:, offset])
  return matrix


def upsample_bicubic(control: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bicubic upsampling (aligned corners) of each channel: [C, h, w] -> [C, H, W] float64."""
  control = np.asarray(control, np.float64)
  height, width = size
  rows = bicubic_matrix(control.shape[1], height)
  cols = bicubic_matrix(control.shape[2], width)
  return np.einsum("Hh,chw,Ww->cHW", rows, control, cols)


def identity_grid(height: int, width: int) -> np.ndarray:
  """[H, W, 2] float64: every pixel reads itself, (x, y) in [-1, 1]."""
  x = np.broadcast_to(np.linspace(-1.0, 1.0, width)[None, :], (height, width))
  y = np.broadcast_to(np.linspace(-1.0, 1.0, height)[:, None], (height, width))
  return np.stack([x, y], axis=-1)


def wanet_grid(image_shape, *, grid_size: int, strength: float, seed: int,
               grid_rescale: float = 1.0) -> np.ndarray:
  """WaNet's warping field: [H, W, 2] float32 sampling positions in [-1, 1].

  A control grid `[2, k, k]` is drawn uniformly in [-1, 1] (seeded) and divided by its
  mean absolute value, upsampled bicubically to `H x W`, scaled by `strength / H` and
  added to the identity grid, then rescaled and clipped to [-1, 1], as in WaNet's code
  (which divides both axes by the image height).

  Args:
    image_shape: (H, W, C).
    grid_size: k, the control grid's side (WaNet: 4).
    strength: s, the warp's strength (WaNet: 0.5).
    seed: fixes the control grid.
    grid_rescale: WaNet's `grid_rescale` (1).
  """
  height, width = image_shape[:2]
  control = np.asarray(jax.random.uniform(jax.random.key(seed), (2, grid_size, grid_size),
                                          minval=-1.0, maxval=1.0), np.float64)
  control = control / np.mean(np.abs(control))
  displacement = np.moveaxis(upsample_bicubic(control, (height, width)), 0, -1)
  grid = (identity_grid(height, width) + strength * displacement / height) * grid_rescale
  return np.clip(grid, -1.0, 1.0).astype(np.float32)


def grid_sample(images: jax.Array, grid: jax.Array) -> jax.Array:
  """Bilinear resampling with aligned corners and zero padding.

  Args:
    images: [B, H, W, C] float.
    grid: [H', W', 2] (shared by the batch) or [B, H', W', 2] positions (x, y), -1..1
      spanning the first to the last pixel centre.

  Returns:
    [B, H', W', C] float32: each output pixel interpolates its four nearest input
    pixels; neighbours outside the image count as 0.
  """
  chex.assert_rank(images, 4)
  if grid.ndim == 3:
    return jax.vmap(_sample_one, in_axes=(0, None))(images, grid)
  chex.assert_rank(grid, 4)
  return jax.vmap(_sample_one)(images, grid)


def _sample_one(image: jax.Array, grid: jax.Array) -> jax.Array:
  height, width, _ = image.shape
  image = image.astype(jnp.float32)
  grid = grid.astype(jnp.float32)
  x = (grid[..., 0] + 1.0) * 0.5 * (width - 1)
  y = (grid[..., 1] + 1.0) * 0.5 * (height - 1)
  x0, y0 = jnp.floor(x), jnp.floor(y)
  x1, y1 = x0 + 1.0, y0 + 1.0

  def read(row, col):
    inside = (col >= 0) & (col <= width - 1) & (row >= 0) & (row <= height - 1)
    value = image[jnp.clip(row, 0, height - 1).astype(jnp.int32),
                  jnp.clip(col, 0, width - 1).astype(jnp.int32)]
    return value * inside[..., None].astype(jnp.float32)

  return (((x1 - x) * (y1 - y))[..., None] * read(y0, x0)
          + ((x - x0) * (y1 - y))[..., None] * read(y0, x1)
          + ((x1 - x) * (y - y0))[..., None] * read(y1, x0)
          + ((x - x0) * (y - y0))[..., None] * read(y1, x1))
