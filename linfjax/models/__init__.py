"""Classifiers as pure Flax Linen modules that expose their layers and take channel masks.

`MODELS` names every architecture; `create(name, num_classes=..., ...)` builds one (the same
settings give the same module object, so a grid's runs share compilations). Every model is
a `LayeredClassifier`: a chain of named layers and a pooled dense head, returning
`(logits, activations)` and taking per-layer channel masks (linfjax/models/layered.py). A new
architecture is one module and one line in `MODELS`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from linfjax import settings

from linfjax.models.alexnet import AlexNet
from linfjax.models.cnn import CNN
from linfjax.models.layered import CIFAR10_MEAN, CIFAR10_STD, HEAD_POOLS, LayeredClassifier, Masks
from linfjax.models.preact_resnet import PreActResNet18
from linfjax.models.vgg import VGG11, VGG16

MODELS: dict[str, Callable[..., LayeredClassifier]] = {
    "cnn": CNN,
    "preact_resnet18": PreActResNet18,
    "vgg11": VGG11,
    "vgg16": VGG16,
    "alexnet": AlexNet,
}


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The `model` block."""
  name: str = settings.spec("preact_resnet18", settings.choice(*MODELS),
                            "The architecture (linfjax/models/).")
  width: float = settings.spec(1.0, settings.number(0.0, 64.0, low_open=True),
                               "Channel multiplier.")
  probe_layers: tuple = settings.spec((), settings.described(
      "layer names of the model; empty: the last conv map before pooling"),
      "Layers whose activations the analysis measures; empty: the model's default.")
  head_pool: str = settings.spec("", settings.choice("", *HEAD_POOLS),
                                 'Pooling before the dense head: "" is the model\'s own (global '
                                 'average; VGG: global max), or "avg", "max", "max2_avg" (a 2x2 '
                                 "max-pool, then the global average).")

  def check(self, prefix: str) -> None:
    if self.name == "alexnet" and self.head_pool:
      settings.fail(f"{prefix}.head_pool", f"{self.head_pool!r} does not apply to alexnet, whose "
                    "classifier (max-pool, fc6, fc7) is its own; leave it empty")
    known = layer_names(create(self.name, num_classes=1, width=self.width))
    for layer in self.probe_layers:
      if layer not in known:
        settings.fail(f"{prefix}.probe_layers", f"unknown layer {layer!r} of model "
                      f"{self.name!r}; known: {', '.join(known)}")


def check_layers(model_values: Settings, field: str, layers, *, empty: str) -> None:
  """ConfigError naming `field` when a layer is not one of the model's (`empty` says what an
  empty name means)."""
  known = layer_names(create(model_values.name, num_classes=1, width=model_values.width))
  for layer in layers:
    if layer not in known:
      settings.fail(field, f"unknown layer {layer!r} of model {model_values.name!r}; known: "
                    f"{', '.join(known)} ({empty})")


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


def from_config(model_block, *, num_classes: int,
                channel_stats: tuple[Sequence[float], Sequence[float]],
                compute_dtype: str = "float32", **overrides) -> LayeredClassifier:
  """The model a config's `model` block describes, through `create` (so shared).

  Args:
    model_block: a config's `model` block (name, width, probe layers, head pooling).
    num_classes: the dataset's classes.
    channel_stats: (mean, std) per channel of the training images in [0, 1], the model's
      input normalisation (`Dataset.channel_stats`).
    compute_dtype: the `train` block's compute dtype.
    **overrides: other `create` arguments, e.g. `probe_layers`.
  """
  mean, std = channel_stats
  kwargs = dict(num_classes=num_classes, width=model_block.width, mean=tuple(mean),
                std=tuple(std), probe_layers=tuple(model_block.probe_layers),
                head_pool=model_block.head_pool, dtype=jnp.dtype(compute_dtype))
  kwargs.update(overrides)
  return create(model_block.name, **kwargs)


def layer_names(model: LayeredClassifier) -> tuple[str, ...]:
  """The model's layer names in order, without initialising it."""
  return tuple(name for name, _ in model.layer_plan())


def init(model: LayeredClassifier, key: jax.Array, image_shape) -> dict:
  """Initial variables ({'params', 'batch_stats'}) for images of `image_shape` (H, W, C)."""
  return model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)


__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "HEAD_POOLS", "MODELS", "LayeredClassifier", "Masks",
           "Settings", "check_layers", "create", "from_config", "init", "layer_names"]
