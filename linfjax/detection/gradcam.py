"""Grad-CAM at any layer, and how much of its attention falls on a trigger.

docs/method.md ("Grad-CAM"): for class `c` and layer `L` with activation `A`
`[H', W', K]`, `alpha_k = mean_{h,w} d logit_c / d A_k` and
`map = ReLU(sum_k alpha_k A_k)`, resized to the input (bilinear) and scaled to
[0, 1] per image. The model's `stop=`/`start=` split gives `A` and the head
after it, so the gradient is taken with respect to the activation itself.

References:
  Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
  Gradient-based Localization", ICCV 2017.
"""

from __future__ import annotations

import functools
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from linfjax import data, pixels


def gradcam(variables, images: jax.Array, classes: jax.Array, *, apply_fn: Callable,
            layer: str) -> jax.Array:
  """Grad-CAM maps of a batch, each for its own class.

  Images are independent in evaluation mode, so the gradient of the summed logits gives
  every image's own gradient in one backward pass.

  Args:
    variables: the model's variables.
    images: [B, H, W, C], uint8 pixels or floats in [0, 1] (`pixels.to_unit_float`).
    classes: [B] int, the class whose logit each map explains.
    apply_fn: `model.apply` of a `models.LayeredClassifier`.
    layer: the layer `L` (a name in the model's layer plan).

  Returns:
    [B, H, W] float32 in [0, 1]; an image whose map is zero everywhere stays zero.
  """
  chex.assert_rank(images, 4)
  chex.assert_shape(classes, (images.shape[0],))
  batch, height, width, _ = images.shape
  features, _ = apply_fn(variables, pixels.to_unit_float(images), stop=layer)
  features = features.astype(jnp.float32)

  def class_logits(activation):
    logits, _ = apply_fn(variables, activation, start=layer)
    return jnp.sum(jnp.take_along_axis(logits, classes[:, None], axis=1))

  gradients = jax.grad(class_logits)(features)
  alpha = jnp.mean(gradients, axis=(1, 2))
  cam = jax.nn.relu(jnp.einsum("bhwk,bk->bhw", features, alpha))
  cam = jnp.maximum(jax.image.resize(cam, (batch, height, width), "bilinear"), 0.0)
  peak = jnp.max(cam, axis=(1, 2), keepdims=True)
  return cam / jnp.where(peak > 0, peak, 1.0)


@functools.lru_cache(maxsize=None)
def compiled_gradcam(apply_fn: Callable, layer: str) -> Callable:
  """`gradcam` jitted for one model function and layer: (variables, images, classes) -> maps."""
  return jax.jit(functools.partial(gradcam, apply_fn=apply_fn, layer=layer))


def attention(maps: jax.Array, region: jax.Array) -> jax.Array:
  """Trigger attention: the share of each map's mass inside a region.

  With `attacks.region(trigger)` as the region, a patch trigger's region is its square;
  a blend trigger changes every pixel, so its region is the whole image and its attention
  is 1 for any non-zero map (the score says nothing for whole-image triggers).

  Args:
    maps: [B, H, W] non-negative maps.
    region: [H, W] bool.

  Returns:
    [B] float32 in [0, 1]; 0 for a map that is zero everywhere.
  """
  chex.assert_rank(maps, 3)
  chex.assert_shape(region, maps.shape[1:])
  maps = maps.astype(jnp.float32)
  inside = jnp.sum(maps * region.astype(jnp.float32)[None], axis=(1, 2))
  total = jnp.sum(maps, axis=(1, 2))
  return jnp.where(total > 0, inside / jnp.where(total > 0, total, 1.0), 0.0)


def batched_gradcam(apply_fn: Callable, variables, images: np.ndarray, classes: np.ndarray, *,
                    layer: str, batch_size: int) -> np.ndarray:
  """Grad-CAM over many images in fixed-size (padded) batches: [N, H, W] float32."""
  step = compiled_gradcam(apply_fn, layer)
  maps = []
  images = np.asarray(images)
  classes = np.asarray(classes, np.int32)
  for (batch, batch_classes), num_valid in data.padded_batches(batch_size, images, classes):
    maps.append(np.asarray(step(variables, batch, batch_classes))[:num_valid])
  return np.concatenate(maps)
