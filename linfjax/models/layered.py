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
are images in [0, 1] and triggers act in pixel space (docs/method.md).
"""

from __future__ import annotations

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
    """The last conv feature map before pooling (docs/method.md's default layer L)."""
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
