"""PreActResNet-18 in plain PyTorch, the architecture of BackdoorBench's `models/preact_resnet.py`.

The reference that `benchmarks/train_step.py` times linfjax's `preact_resnet18` against:
a bare 3x3 stem conv, pre-activation basic blocks [2, 2, 2, 2] of widths 64-512 whose
projection shortcut (a 1x1 conv) reads the pre-activated input, global average pooling and
a linear head. Inputs are normalised [B, 3, H, W] float32 images.
"""

import torch
from torch import nn
from torch.nn import functional as F


class PreActBlock(nn.Module):
  """BN-ReLU-conv twice, plus the input (or its 1x1 projection when the shape changes)."""

  def __init__(self, in_channels: int, channels: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_channels)
    self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(channels)
    self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    self.shortcut = None
    if stride != 1 or in_channels != channels:
      self.shortcut = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)

  def forward(self, x):
    out = F.relu(self.bn1(x))
    shortcut = x if self.shortcut is None else self.shortcut(out)
    out = self.conv1(out)
    out = self.conv2(F.relu(self.bn2(out)))
    return out + shortcut


class PreActResNet18(nn.Module):
  """[B, 3, H, W] -> [B, num_classes] logits."""

  def __init__(self, num_classes: int = 10):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    blocks, in_channels = [], 64
    for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
      blocks += [PreActBlock(in_channels, channels, stride), PreActBlock(channels, channels, 1)]
      in_channels = channels
    self.blocks = nn.Sequential(*blocks)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.linear = nn.Linear(512, num_classes)

  def forward(self, x):
    out = self.avgpool(self.blocks(self.conv1(x)))
    return self.linear(torch.flatten(out, 1))
