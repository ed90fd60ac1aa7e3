"""BPP (Floyd-Steinberg dithering) and FTrojan (block DCT bump) against NumPy/SciPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft

from linfjax import attacks, config as config_lib
from linfjax.attacks import bpp, ftrojan, poison
from linfjax.settings import ConfigError


def _floyd_steinberg(image, levels):
  """BackdoorBench's floydDitherspeed, written plainly, on [0, 1] float32 pixels."""
  image = image.astype(np.float32).copy()
  height, width, _ = image.shape
  steps = np.float32(levels - 1)
  for y in range(height):
    for x in range(width):
      old = image[y, x].copy()
      new = np.round(old * steps) / steps
      error = old - new
      image[y, x] = new
      if x + 1 < width:
        image[y, x + 1] += error * np.float32(0.4375)
      if y + 1 < height and x + 1 < width:
        image[y + 1, x + 1] += error * np.float32(0.0625)
      if y + 1 < height:
        image[y + 1, x] += error * np.float32(0.3125)
      if y + 1 < height and x >= 1:
        image[y + 1, x - 1] += error * np.float32(0.1875)
  return np.clip(image, 0, 1)


def _trigger_config(**overrides):
  block = config_lib.base_config().trigger
  block.update(overrides)
  return block


@pytest.mark.parametrize("levels", [2, 8])
def test_bpp_dithering_equals_plain_floyd_steinberg(levels):
  images = np.random.default_rng(levels).random((3, 5, 6, 3), dtype=np.float32)
  trigger = bpp.bpp((5, 6, 3), squeeze_num=levels)
  stamped = np.asarray(jax.jit(attacks.apply)(trigger, jnp.asarray(images)))
  for image, got in zip(images, stamped):
    np.testing.assert_array_equal(got, _floyd_steinberg(image, levels))
  assert len(np.unique(np.round(stamped * (levels - 1), 4))) <= levels
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), trigger, bpp.bpp((5, 6, 3),
                                                                             squeeze_num=4))
  both = jax.vmap(attacks.apply, in_axes=(0, None))(stacked, jnp.asarray(images))
  # A traced level count may divide where a constant one multiplies by the reciprocal: 1 ulp.
  np.testing.assert_allclose(np.asarray(both[0]), stamped, atol=1e-6)


def test_ftrojan_matches_scipy_dct():
  shape = (16, 16, 3)
  images = np.random.default_rng(0).uniform(0.2, 0.8, (2, *shape))
  trigger = attacks.from_config(_trigger_config(**{**attacks.PRESETS["ftrojan"], "window": 8}), shape)
  np.testing.assert_allclose(np.asarray(trigger.dct) @ np.eye(8),
                             scipy.fft.dct(np.eye(8), axis=0, norm="ortho"), atol=1e-6)
  yuv = images @ ftrojan.RGB_TO_YUV.T
  blocks = yuv.reshape(2, 2, 8, 2, 8, 3)
  coefficients = scipy.fft.dctn(blocks, axes=(2, 4), norm="ortho")
  np.testing.assert_allclose(scipy.fft.idctn(coefficients, axes=(2, 4), norm="ortho"), blocks,
                             atol=1e-12)
  for row, col in [(3, 3), (7, 7)]:
    coefficients[:, :, row, :, col, 1:] += 30 / 255
  back = scipy.fft.idctn(coefficients, axes=(2, 4), norm="ortho").reshape(2, *shape)
  expected = np.clip(back @ np.linalg.inv(ftrojan.RGB_TO_YUV).T, 0, 1)
  stamped = np.asarray(jax.jit(attacks.apply)(trigger, jnp.asarray(images, jnp.float32)))
  np.testing.assert_allclose(stamped, expected, atol=2e-5)
  assert np.abs(stamped - images).max() > 0.01
  assert np.asarray(attacks.region(trigger)).all()


@pytest.mark.parametrize("kind", ["bpp", "ftrojan"])
def test_poisoning_through_the_registry(kind):
  shape = (32, 32, 3)
  block = _trigger_config(**attacks.PRESETS[kind])
  attacks.check(block, "all_to_one")
  attacks.check_data(block, shape)
  assert not attacks.has_region(block)
  trigger = attacks.from_config(block, shape)
  labels = np.arange(40) % 10
  images = np.random.default_rng(1).integers(0, 256, (40, *shape), dtype=np.uint8)
  result = poison.poison(images, labels, trigger, rate=0.25, target=0, mode="all_to_one",
                         stamp="before_augmentation", num_classes=10, seed=0)
  chosen = result.poison_indices
  assert len(chosen) == 10 and (labels[chosen] != 0).all() and (result.labels[chosen] == 0).all()
  expected = poison.to_uint8(attacks.apply(trigger, images[chosen].astype(np.float32) / 255.0))
  np.testing.assert_array_equal(result.images[chosen], expected)
  assert (result.images[chosen] != images[chosen]).mean() > 0.5
  rest = np.setdiff1d(np.arange(40), chosen)
  np.testing.assert_array_equal(result.images[rest], images[rest])


def test_bad_values_are_one_line_errors():
  with pytest.raises(ConfigError, match="trigger.squeeze_num"):
    attacks.check(_trigger_config(kind="bpp", squeeze_num=1), None)
  with pytest.raises(ConfigError, match="trigger.window"):
    attacks.check_data(_trigger_config(kind="ftrojan", window=5), (32, 32, 3))
  with pytest.raises(attacks.TriggerError, match="squeeze_num 1"):
    bpp.bpp((8, 8, 3), squeeze_num=1)
