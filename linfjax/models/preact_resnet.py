"""PreActResNet-18, BackdoorBench's architecture (He et al., "Identity Mappings in Deep
Residual Networks", 2016)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from linfjax.models.layered import LayeredClassifier


class PlainConv(nn.Module):
  """A bare 3x3 conv (PreActResNet's stem: the blocks normalise their own input)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    return nn.Conv(self.features, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(x)


class PreActBlock(nn.Module):
  """Pre-activation basic block (He et al., 2016), as in BackdoorBench's PreActResNet.

  Its output is the residual sum; a pre-activation network has no ReLU after the
  add (the next block normalises and activates its input).
  """
  features: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)
    out = nn.relu(norm()(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1), strides=self.stride, use_bias=False,
                         dtype=self.dtype)(out)
    out = nn.Conv(self.features, (3, 3), strides=self.stride, padding=1, use_bias=False,
                  dtype=self.dtype)(out)
    out = nn.relu(norm()(out))
    out = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(out)
    return out + shortcut


class PreActResNet18(LayeredClassifier):
  """PreActResNet-18 (blocks [2, 2, 2, 2], widths 64-512), BackdoorBench's architecture."""

  def layer_plan(self):
    plan = [("conv1", functools.partial(PlainConv, self.channels(64), dtype=self.dtype))]
    for stage, (base, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
      for block in (1, 2):
        plan.append((f"block{stage}_{block}",
                     functools.partial(PreActBlock, self.channels(base),
                                       stride=stride if block == 1 else 1, dtype=self.dtype)))
    return plan
