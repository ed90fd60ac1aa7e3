"""WaNet's warp against hand-built references: Keys' bicubic weights, bilinear sampling."""

import jax
import jax.numpy as jnp
import numpy as np

from linfjax.attacks import warp


def _keys(x, a=-0.75):
  """Keys' cubic convolution kernel, written out from its definition."""
  x = abs(x)
  if x <= 1:
    return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
  if x < 2:
    return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
  return 0.0


def _bicubic_reference(control, out_h, out_w):
  """Per-output-pixel bicubic upsampling with aligned corners and clamped neighbours."""
  channels, in_h, in_w = control.shape
  out = np.zeros((channels, out_h, out_w))
  for i in range(out_h):
    sy = i * (in_h - 1) / (out_h - 1)
    y0 = int(np.floor(sy))
    for j in range(out_w):
      sx = j * (in_w - 1) / (out_w - 1)
      x0 = int(np.floor(sx))
      for dy in range(-1, 3):
        for dx in range(-1, 3):
          weight = _keys(sy - (y0 + dy)) * _keys(sx - (x0 + dx))
          row = min(max(y0 + dy, 0), in_h - 1)
          col = min(max(x0 + dx, 0), in_w - 1)
          out[:, i, j] += weight * control[:, row, col]
  return out


def _bilinear_reference(image, grid):
  """grid_sample by hand: four neighbours, aligned corners, zeros outside."""
  height, width, channels = image.shape
  out = np.zeros((*grid.shape[:2], channels))
  for i in range(grid.shape[0]):
    for j in range(grid.shape[1]):
      x = (grid[i, j, 0] + 1) / 2 * (width - 1)
      y = (grid[i, j, 1] + 1) / 2 * (height - 1)
      x0, y0 = int(np.floor(x)), int(np.floor(y))
      for row, col in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
        weight = (1 - abs(x - col)) * (1 - abs(y - row))
        if 0 <= row < height and 0 <= col < width:
          out[i, j] += weight * image[row, col]
  return out


def test_bicubic_matches_keys_kernel_by_hand():
  control = np.random.default_rng(0).uniform(-1, 1, (2, 4, 4))
  upsampled = warp.upsample_bicubic(control, (9, 7))
  np.testing.assert_allclose(upsampled, _bicubic_reference(control, 9, 7), atol=1e-12)
  # Aligned corners: the corner samples are the control grid's corners.
  np.testing.assert_allclose(upsampled[:, [0, 0, -1, -1], [0, -1, 0, -1]],
                             control[:, [0, 0, -1, -1], [0, -1, 0, -1]], atol=1e-12)
  np.testing.assert_allclose(warp.bicubic_matrix(4, 32).sum(1), 1.0, atol=1e-12)


def test_grid_sample_identity_shift_and_half_pixel():
  image = np.random.default_rng(1).random((1, 5, 6, 3)).astype(np.float32)
  identity = warp.identity_grid(5, 6).astype(np.float32)
  sample = jax.jit(warp.grid_sample)
  np.testing.assert_allclose(sample(image, identity), image, atol=1e-6)
  # Reading one pixel to the right shifts the image left; the last column reads outside: 0.
  shifted = identity.copy()
  shifted[..., 0] += 2 / (6 - 1)
  out = np.asarray(sample(image, shifted))
  np.testing.assert_allclose(out[0, :, :5], image[0, :, 1:], atol=1e-6)
  np.testing.assert_allclose(out[0, :, 5], 0.0, atol=1e-6)
  # Half a pixel down: the mean of two rows.
  half = identity.copy()
  half[..., 1] += 0.5 * 2 / (5 - 1)
  out = np.asarray(sample(image, half))
  np.testing.assert_allclose(out[0, :4], (image[0, :4] + image[0, 1:]) / 2, atol=1e-6)


def test_grid_sample_random_grids_match_the_hand_reference():
  rng = np.random.default_rng(2)
  images = rng.random((2, 6, 5, 3)).astype(np.float32)
  grids = rng.uniform(-1.1, 1.1, (2, 4, 7, 2)).astype(np.float32)
  out = np.asarray(jax.jit(warp.grid_sample)(images, grids))
  for b in range(2):
    np.testing.assert_allclose(out[b], _bilinear_reference(images[b], grids[b]), atol=1e-5)


def test_wanet_grid_is_the_published_construction():
  shape, k, s, seed = (8, 8, 3), 4, 0.5, 3
  control = np.asarray(jax.random.uniform(jax.random.key(seed), (2, k, k), minval=-1.0,
                                          maxval=1.0), np.float64)
  control /= np.mean(np.abs(control))
  displacement = np.moveaxis(_bicubic_reference(control, 8, 8), 0, -1)
  rows, cols = np.meshgrid(np.linspace(-1, 1, 8), np.linspace(-1, 1, 8), indexing="ij")
  expected = np.clip(np.stack([cols, rows], -1) + s * displacement / 8, -1, 1)
  grid = warp.wanet_grid(shape, grid_size=k, strength=s, seed=seed)
  assert grid.shape == (8, 8, 2) and grid.dtype == np.float32
  np.testing.assert_allclose(grid, expected, atol=1e-6)
  np.testing.assert_array_equal(grid, warp.wanet_grid(shape, grid_size=k, strength=s, seed=seed))
  assert not np.allclose(grid, warp.wanet_grid(shape, grid_size=k, strength=s, seed=seed + 1))
  # The field is small: no pixel moves by more than s * max|displacement| / H in [-1, 1] units.
  assert np.abs(grid - np.stack([cols, rows], -1)).max() <= s * np.abs(displacement).max() / 8 + 1e-6
  assert float(jnp.abs(jnp.asarray(displacement)).mean()) > 0.5
