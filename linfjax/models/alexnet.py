"""An AlexNet-style network for 32x32 inputs: the paper's GTSRB model (Krizhevsky et al.,
"ImageNet Classification with Deep Convolutional Neural Networks", 2012)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from linfjax.models.layered import LayeredClassifier


class AlexConv(nn.Module):
  """An AlexNet stage: optional 3x3 stride-2 max-pool, conv, batch norm, ReLU."""
  features: int
  kernel: int
  pool_first: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if self.pool_first:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    x = nn.Conv(self.features, (self.kernel, self.kernel), padding="SAME", use_bias=False,
                dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
    return nn.relu(x)


class AlexNet(LayeredClassifier):
  """An AlexNet-style net for 32x32 inputs (the paper's GTSRB setting).

  Five convs as AlexNet's (5x5 64, 5x5 192, 3x3 384, 3x3 256, 3x3 256) with its
  overlapping 3x3 stride-2 max-pools after conv1, conv2 and conv5, stride 1 and no
  11x11 stem for small images, and batch norm after every conv (ours: ANP and CLP act
  on batch-norm neurons). The classifier is AlexNet's: the 4x4 map flattened, two ReLU
  dense layers of 4096 (without dropout: the training step draws no dropout keys) and
  the dense head. conv5 is the last conv map, the default probe and pruning layer. Its
  classifier is its own, so `head_pool` does not apply (config validation refuses one).
  """

  def layer_plan(self):
    plan = ((64, 5, False), (192, 5, True), (384, 3, True), (256, 3, False), (256, 3, False))
    return [(f"conv{i}", functools.partial(AlexConv, self.channels(base), kernel,
                                           pool_first=pool, dtype=self.dtype))
            for i, (base, kernel, pool) in enumerate(plan, start=1)]

  def setup(self):
    super().setup()
    self.fc6 = nn.Dense(self.channels(4096), dtype=self.dtype)
    self.fc7 = nn.Dense(self.channels(4096), dtype=self.dtype)

  def pool(self, x):
    """AlexNet's last max-pool, flattened, then fc6 and fc7: [B, 8, 8, K] -> [B, 4096]."""
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    x = x.reshape(x.shape[0], -1)
    return nn.relu(self.fc7(nn.relu(self.fc6(x))))
