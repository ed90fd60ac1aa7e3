"""One image convention (uint8 stored, float32 in [0, 1] inside) at every entry point."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linfjax import data, pixels
from linfjax.detection import gradcam
from linfjax.training import metrics
from linfjax import attacks


def _uint8_images(n=4, size=8, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_to_unit_float_converts_pixels_once():
  images = _uint8_images()
  np.testing.assert_allclose(jax.jit(pixels.to_unit_float)(images), images / 255.0, rtol=1e-6)
  floats = images.astype(np.float32) / 255.0
  np.testing.assert_array_equal(pixels.to_unit_float(floats), floats)  # not divided again
  with pytest.raises(TypeError, match="uint8 pixels or floats"):
    pixels.to_unit_float(images.astype(np.int32))


def test_blend_on_float_images_matches_numpy_and_uint8_is_refused():
  images = _uint8_images()
  pattern = np.random.default_rng(1).uniform(size=(8, 8, 3)).astype(np.float32)
  trigger = attacks.blend((8, 8, 3), alpha=0.2, pattern=pattern)
  x = pixels.to_unit_float(images)
  expected = 0.8 * (images / 255.0) + 0.2 * pattern
  np.testing.assert_allclose(jax.jit(attacks.apply)(trigger, x), expected, atol=1e-6)
  # The old cast turned the 0.2 mask into 0 on uint8 images and left them unchanged.
  with pytest.raises(TypeError, match="float images"):
    attacks.apply(trigger, jnp.asarray(images))


def test_apply_computes_in_float32_and_keeps_a_bfloat16_batch_bfloat16():
  trigger = attacks.blend((8, 8, 3), alpha=0.2, pattern=np.full((8, 8, 3), 0.5, np.float32))
  x = jnp.full((1, 8, 8, 3), 1.0, jnp.bfloat16)
  out = attacks.apply(trigger, x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), 0.9, atol=4e-3)


def test_gradcam_gives_the_same_maps_for_uint8_pixels_and_their_floats():
  keys = jax.random.split(jax.random.key(0), 2)
  variables = {"project": jax.random.normal(keys[0], (3, 3)),
               "head": jax.random.normal(keys[1], (3, 4))}

  def apply_fn(variables, x, *, start=None, stop=None):
    features = x if start == "f" else jax.nn.relu(
        jnp.einsum("bhwc,ck->bhwk", x, variables["project"]) - 0.5)
    if stop == "f":
      return features, {}
    return jnp.mean(features, axis=(1, 2)) @ variables["head"], {}

  images = _uint8_images()
  classes = np.array([0, 1, 2, 3], np.int32)
  from_pixels = gradcam.batched_gradcam(apply_fn, variables, images, classes, layer="f",
                                        batch_size=3)
  from_floats = gradcam.batched_gradcam(apply_fn, variables, images / np.float32(255.0),
                                        classes, layer="f", batch_size=3)
  np.testing.assert_allclose(from_pixels, from_floats, atol=1e-6)
  # What the old path computed (uint8 cast to 0..255 floats) gives other maps here.
  unscaled = gradcam.batched_gradcam(apply_fn, variables, images.astype(np.float32), classes,
                                     layer="f", batch_size=3)
  assert np.abs(unscaled - from_floats).max() > 0.05


def test_metrics_accept_float_images_without_dividing_twice():
  images = _uint8_images(n=6)
  trigger = attacks.patch((8, 8, 3), size=2, row=0, col=0, pattern=np.ones((2, 2, 3)))

  def apply_fn(variables, x):  # Class = which third of [0, 1] the mean pixel falls in.
    mean = jnp.mean(x, axis=(1, 2, 3))
    return jax.nn.one_hot(jnp.clip((mean * 3).astype(jnp.int32), 0, 2), 3), {}

  as_pixels = metrics.predict_clean_and_triggered(apply_fn, {}, images, trigger, batch_size=4)
  as_floats = metrics.predict_clean_and_triggered(apply_fn, {}, images / np.float32(255.0),
                                                  trigger, batch_size=4)
  expected = np.clip((images.mean(axis=(1, 2, 3)) / 255.0 * 3).astype(int), 0, 2)
  np.testing.assert_array_equal(as_pixels[0], expected)
  for a, b in zip(as_pixels, as_floats):
    np.testing.assert_array_equal(a, b)


def test_padded_batches_refuse_arrays_of_different_lengths():
  with pytest.raises(ValueError, match=r"lengths \[7, 6\]"):
    list(data.padded_batches(3, np.zeros((7, 2)), np.zeros(6)))
  with pytest.raises(ValueError, match="batch_size >= 1"):
    list(data.padded_batches(0, np.zeros(3)))
