"""Batch-norm neurons of a Flax model, read and rescaled on its variables pytree.

A batch-norm layer's neuron `k` has a scale `gamma_k` and a bias `beta_k` in
`variables["params"]` and running statistics in `variables["batch_stats"]`, at the same
path. A layer is named by that path joined with "/", e.g. "conv3_2/BatchNorm_0" (a
`ConvBN`'s norm) or "block4_2/BatchNorm_1" (the inner norm of a pre-activation block).
Masks and perturbations are dicts {layer name: [K] array}; `rescale` returns new
variables with the scales and biases multiplied by them, so a defense that masks or
perturbs neurons never changes the model's code, and the function stays differentiable
and jittable in the factors.
"""

from __future__ import annotations

import re
from typing import Mapping

import jax
from flax import traverse_util

Factors = Mapping[str, jax.Array]


def _natural_key(name: str):
  """Sorts "conv10" after "conv9", so names follow the model's layer order."""
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def layer_names(variables) -> tuple[str, ...]:
  """Every batch-norm layer (a params node with `scale` and `bias` whose batch_stats node has
  `mean` and `var`), in natural order of the path names."""
  params = traverse_util.flatten_dict(variables["params"])
  stats = traverse_util.flatten_dict(variables.get("batch_stats", {}))
  names = {path[:-1] for path in params if path[-1] == "scale"
           and path[:-1] + ("bias",) in params and path[:-1] + ("mean",) in stats
           and path[:-1] + ("var",) in stats}
  return tuple(sorted(("/".join(path) for path in names), key=_natural_key))


def _node(tree, name: str):
  for part in name.split("/"):
    tree = tree[part]
  return tree


def scale(variables, name: str) -> jax.Array:
  """gamma of layer `name`: [K]."""
  return _node(variables["params"], name)["scale"]


def bias(variables, name: str) -> jax.Array:
  """beta of layer `name`: [K]."""
  return _node(variables["params"], name)["bias"]


def running_var(variables, name: str) -> jax.Array:
  """The running variance of layer `name`: [K]."""
  return _node(variables["batch_stats"], name)["var"]


def sizes(variables) -> dict[str, int]:
  """{layer name: K} for every batch-norm layer."""
  return {name: int(scale(variables, name).shape[0]) for name in layer_names(variables)}


def rescale(variables, scale_factors: Factors, bias_factors: Factors | None = None) -> dict:
  """New variables with `gamma * scale_factors[name]` and `beta * bias_factors[name]`.

  Layers missing from a dict keep their value; the input is not modified.

  Args:
    variables: {'params', 'batch_stats'}.
    scale_factors, bias_factors: {layer name: [K]}.
  """
  bias_factors = bias_factors or {}
  unknown = (set(scale_factors) | set(bias_factors)) - set(layer_names(variables))
  if unknown:
    raise KeyError(f"not batch-norm layers of these variables: {sorted(unknown)}; known: "
                   f"{', '.join(layer_names(variables))}")
  flat = dict(traverse_util.flatten_dict(variables["params"]))
  for factors, leaf in ((scale_factors, "scale"), (bias_factors, "bias")):
    for name, factor in factors.items():
      path = tuple(name.split("/")) + (leaf,)
      flat[path] = flat[path] * factor.astype(flat[path].dtype)
  return {**variables, "params": traverse_util.unflatten_dict(flat)}
