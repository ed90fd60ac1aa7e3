"""The one image convention: uint8 pixels in storage, float32 in [0, 1] inside, converted here.

Datasets (`linfjax.data`) hold uint8 [N, H, W, C]; every function that computes on images
(models, triggers, norms, Grad-CAM, metrics, training) works on floats in [0, 1]. Code
where images enter a computation calls `to_unit_float`, which divides uint8 by 255 and
passes floats through, so neither a uint8 batch (scaled to 0..255 by mistake) nor a float
batch (divided by 255 twice) can silently give wrong numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def to_unit_float(images) -> jax.Array:
  """[..., H, W, C] uint8 pixels (0..255) or floats in [0, 1] -> float32 in [0, 1].

  Raises:
    TypeError: for other integer or non-numeric dtypes (a bug in the caller).
  """
  dtype = np.dtype(images.dtype)
  if dtype == np.uint8:
    return jnp.asarray(images).astype(jnp.float32) / 255.0
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.asarray(images).astype(jnp.float32)
  raise TypeError(f"images must be uint8 pixels or floats in [0, 1], got {dtype}")


def require_float(images, what: str) -> None:
  """Raises TypeError unless `images` are floats (the inside convention)."""
  if not jnp.issubdtype(np.dtype(images.dtype), jnp.floating):
    raise TypeError(f"{what} takes float images in [0, 1], got {images.dtype}; convert "
                    "uint8 pixels with linfjax.pixels.to_unit_float where they enter")
