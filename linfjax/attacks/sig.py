"""SIG: a horizontal sinusoid added to the image, clean-label as published.

`T(x) = clip(x + v, 0, 1)` with `v(i, j) = delta * sin(2 pi j f / W)` on every channel.

References:
  Barni, Kallas and Tondi, "A new Backdoor Attack in CNNs by training set corruption
  without label poisoning", ICIP 2019.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from linfjax import settings
from linfjax.attacks.base import Attack, TriggerError
from linfjax.settings import number, spec

# SIG's published defaults as BackdoorBench runs them (config/attack/sig/default.yaml):
# amplitude delta = 40 of 255 grey levels, frequency f = 6 periods across the width.
SIG_AMPLITUDE = 40 / 255
SIG_FREQUENCY = 6.0


class Signal(NamedTuple):
  """An additive trigger: signal [H, W, C] float32, added and clipped to [0, 1]."""
  signal: jax.Array

  def stamp(self, images: jax.Array) -> jax.Array:
    chex.assert_equal_shape_suffix([images, self.signal[None]], 3)
    return jnp.clip(images + jnp.asarray(self.signal, jnp.float32)[None], 0, 1)

  def region(self) -> jax.Array:
    """The whole image (a sinusoid's zeros are single columns, not a place it avoids)."""
    return jnp.ones(self.signal.shape[:2], bool)


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The `trigger` block's fields of SIG."""
  amplitude: float = spec(SIG_AMPLITUDE, number(0.0, 1.0, low_open=True).when("kind", "sig"),
                          "SIG's delta, in [0, 1] pixel units.")
  frequency: float = spec(SIG_FREQUENCY, number(0.0, 1e4, low_open=True).when("kind", "sig"),
                          "SIG's f, periods across the width.")


def sig(image_shape, *, amplitude: float = SIG_AMPLITUDE,
        frequency: float = SIG_FREQUENCY) -> Signal:
  """SIG's horizontal sinusoid `v(i, j) = amplitude * sin(2 pi j frequency / W)`, all channels.

  Args:
    image_shape: (H, W, C).
    amplitude: delta, in [0, 1] pixel units (SIG_AMPLITUDE = 40 / 255).
    frequency: f, periods across the image width (SIG_FREQUENCY = 6).
  """
  height, width, channels = image_shape
  if not 0.0 < amplitude <= 1.0:
    raise TriggerError(f"SIG amplitude {amplitude} must be in (0, 1] (pixel units)")
  if not frequency > 0.0:
    raise TriggerError(f"SIG frequency {frequency} must be positive")
  row = amplitude * np.sin(2 * np.pi * np.arange(width) * frequency / width)
  signal = np.broadcast_to(row[None, :, None], (height, width, channels)).astype(np.float32)
  return Signal(jnp.asarray(signal))


SIG = Attack(
    settings=Settings,
    build=lambda values, shape: sig(shape, amplitude=values.amplitude,
                                    frequency=values.frequency),
    description="SIG: a horizontal sinusoid over the whole image, clean-label",
    # Delta 40/255, f 6 (BackdoorBench's defaults), clean-label as published: only
    # target-class images are poisoned, labels unchanged.
    preset=dict(kind="sig", amplitude=SIG_AMPLITUDE, frequency=SIG_FREQUENCY, clean_label=True,
                cross_ratio=0.0))
