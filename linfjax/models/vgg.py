"""VGG-11 and VGG-16 with batch norm for 32x32 inputs (Simonyan and Zisserman, 2015)."""

from __future__ import annotations

import functools

from linfjax.models.cnn import ConvBN
from linfjax.models.layered import LayeredClassifier


class VGG11(LayeredClassifier):
  """VGG-11 with batch norm for 32x32 inputs; the head max-pools the last 2x2 map."""

  DEFAULT_HEAD_POOL = "max"

  def layer_plan(self):
    widths = ((64, False), (128, True), (256, True), (256, False), (512, True), (512, False),
            (512, True), (512, False))
    return [(f"conv{i}", functools.partial(ConvBN, self.channels(base), pool_first=pool,
                                           dtype=self.dtype))
            for i, (base, pool) in enumerate(widths, start=1)]


class VGG16(LayeredClassifier):
  """VGG-16 with batch norm for 32x32 inputs (13 convs, 64-512 channels, as BackdoorBench's
  vgg16_bn without its ImageNet classifier); the head max-pools the last 2x2 map."""

  DEFAULT_HEAD_POOL = "max"

  def layer_plan(self):
    widths = ((64, False), (64, False), (128, True), (128, False), (256, True), (256, False),
              (256, False), (512, True), (512, False), (512, False), (512, True), (512, False),
              (512, False))
    return [(f"conv{i}", functools.partial(ConvBN, self.channels(base), pool_first=pool,
                                           dtype=self.dtype))
            for i, (base, pool) in enumerate(widths, start=1)]
