"""The quick small CNN (32-64-128 channels, two 3x3 convs per stage) and its conv block."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from linfjax.models.layered import LayeredClassifier


class ConvBN(nn.Module):
  """3x3 conv, batch norm, ReLU; optionally a 2x2 max-pool before the conv."""
  features: int
  pool_first: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if self.pool_first:
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
    return nn.relu(x)


class CNN(LayeredClassifier):
  """Small VGG-style net (32-64-128 channels, two convs per stage): the quick default."""

  def layer_plan(self):
    return [(f"conv{stage}_{conv}",
             functools.partial(ConvBN, self.channels(base), pool_first=(conv == 1 and stage > 1),
                               dtype=self.dtype))
            for stage, base in enumerate((32, 64, 128), start=1) for conv in (1, 2)]
