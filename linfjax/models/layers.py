"""Classifiers as pure Flax Linen modules that expose their layers and take channel masks.

Every model is a chain of named layers followed by a head (global pooling and a
dense layer). Calling a model returns `(logits, activations)`, where
`activations` maps each probe layer's name to its output `[B, H', W', K]`.
`masks` maps layer names to `[K]` channel multipliers applied to that layer's
output (pruning zeroes channels there; the weights are never changed).

`start` and `stop` cut the chain at a named layer, so the expensive prefix runs
once and the head runs for many masks:

    features, _ = model.apply(variables, x, stop="conv3_2")        # up to L
    logits, _ = model.apply(variables, features, start="conv3_2",  # after L
                            masks={"conv3_2": mask})

With `start=L`, `masks[L]` (if given) multiplies the incoming activation.

Normalisation (per-channel mean and std) is the model's input layer, so inputs
are images in [0, 1] and triggers act in pixel space (METHOD.md).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

Masks = Mapping[str, jax.Array]
# Pooling between the last conv map and the dense head. "max2_avg" max-pools 2x2 windows
# first (ours for the quick CNN: an independent reference recipe pools so, and it learns the
# patch backdoor faster, README "Defaults we chose").
HEAD_POOLS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "avg": lambda x: jnp.mean(x, axis=(1, 2)),
    "max": lambda x: jnp.max(x, axis=(1, 2)),
    "max2_avg": lambda x: jnp.mean(nn.max_pool(x, (2, 2), strides=(2, 2)), axis=(1, 2)),
}
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _channel_mask(mask: jax.Array, activation: jax.Array) -> jax.Array:
  """A [K] mask shaped to multiply a [B, H, W, K] activation."""
  chex.assert_shape(mask, (activation.shape[-1],))
  return mask.astype(activation.dtype).reshape(1, 1, 1, -1)


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


class LayeredClassifier(nn.Module):
  """A chain of named layers and a pooled dense head (see the module docstring).

  Subclasses define `layer_plan()`: the ordered (name, factory) pairs, where each
  factory builds that layer's module (built in `setup`, so the names are known
  without binding the model).
  """
  num_classes: int
  width: float = 1.0
  mean: Sequence[float] = CIFAR10_MEAN
  std: Sequence[float] = CIFAR10_STD
  probe_layers: Sequence[str] = ()
  dtype: Any = jnp.float32
  head_pool: str = ""  # A HEAD_POOLS name; "" is the model's own (DEFAULT_HEAD_POOL).

  DEFAULT_HEAD_POOL = "avg"

  def layer_plan(self) -> list[tuple[str, Callable[[], nn.Module]]]:
    raise NotImplementedError

  def pool(self, x: jax.Array) -> jax.Array:
    """Pooling before the dense head: [B, H, W, K] -> [B, K]."""
    name = self.head_pool or self.DEFAULT_HEAD_POOL
    if name not in HEAD_POOLS:
      raise KeyError(f"unknown head pooling {name!r}; known: {', '.join(HEAD_POOLS)}")
    return HEAD_POOLS[name](x)

  def setup(self):
    plan = self.layer_plan()
    self.layer_names = tuple(name for name, _ in plan)
    self.layers = [build(name=name) for name, build in plan]
    self.head = nn.Dense(self.num_classes, dtype=self.dtype)

  def channels(self, n: int) -> int:
    return max(1, int(round(n * self.width)))

  @property
  def default_probe(self) -> str:
    """The last conv feature map before pooling (METHOD.md's default layer L)."""
    return self.layer_plan()[-1][0]

  def __call__(self, x: jax.Array, masks: Masks | None = None, *, train: bool = False,
               start: str | None = None, stop: str | None = None):
    """Runs the layers after `start` up to and including `stop`.

    Args:
      x: images [B, H, W, C] in [0, 1] (or the activation of layer `start`).
      masks: layer name -> [K] channel multiplier on that layer's output.
      train: batch norm uses batch statistics (and updates `batch_stats`).
      start: name of the layer whose activation `x` is; None: `x` is an image.
      stop: name of the last layer to run; None: run the head and return logits.

    Returns:
      (logits [B, num_classes] float32, or the activation of `stop`), and a dict of
      the probe layers' activations that this call computed.
    """
    masks = dict(masks or {})
    names = self.layer_names
    for name in list(masks) + [start, stop] + list(self.probe_layers):
      if name is not None and name not in names:
        raise KeyError(f"unknown layer {name!r}; this model's layers: {', '.join(names)}")
    first = 0 if start is None else names.index(start) + 1
    last = len(names) if stop is None else names.index(stop) + 1
    if start is None:
      chex.assert_rank(x, 4)
      mean = jnp.asarray(self.mean, jnp.float32).reshape(1, 1, 1, -1)
      std = jnp.asarray(self.std, jnp.float32).reshape(1, 1, 1, -1)
      h = ((x.astype(jnp.float32) - mean) / std).astype(self.dtype)
    else:
      h = x.astype(self.dtype)
      if start in masks:
        h = h * _channel_mask(masks[start], h)
    probes = tuple(self.probe_layers) or (names[-1],)
    activations = {}
    for name, layer in zip(names[first:last], self.layers[first:last]):
      h = layer(h, train)
      if name in masks:
        h = h * _channel_mask(masks[name], h)
      if name in probes:
        activations[name] = h
    if stop is not None:
      return h, activations
    logits = self.head(self.pool(h))
    return logits.astype(jnp.float32), activations


class CNN(LayeredClassifier):
  """Small VGG-style net (32-64-128 channels, two convs per stage): the quick default."""

  def layer_plan(self):
    return [(f"conv{stage}_{conv}",
             functools.partial(ConvBN, self.channels(base), pool_first=(conv == 1 and stage > 1),
                               dtype=self.dtype))
            for stage, base in enumerate((32, 64, 128), start=1) for conv in (1, 2)]


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


MODELS: dict[str, Callable[..., LayeredClassifier]] = {
    "cnn": CNN,
    "preact_resnet18": PreActResNet18,
    "vgg11": VGG11,
    "vgg16": VGG16,
    "alexnet": AlexNet,
}


@functools.lru_cache(maxsize=None)
def create(name: str, **kwargs) -> LayeredClassifier:
  """Builds a model by name; an unknown name lists the known ones.

  The same settings return the same module object. Jitted functions are cached by
  `model.apply`, and bound methods of distinct objects never compare equal, so this is
  what lets every run of a grid reuse one compilation (the arguments must be hashable).
  """
  if name not in MODELS:
    raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
  return MODELS[name](**kwargs)


def layer_names(model: LayeredClassifier) -> tuple[str, ...]:
  """The model's layer names in order, without initialising it."""
  return tuple(name for name, _ in model.layer_plan())


def init(model: LayeredClassifier, key: jax.Array, image_shape) -> dict:
  """Initial variables ({'params', 'batch_stats'}) for images of `image_shape` (H, W, C)."""
  return model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
