"""Channel Lipschitzness-based Pruning (CLP): data-free, from the conv and batch-norm weights.

For a convolution followed directly by batch norm, channel `k` computes
`gamma_k / sigma_k * (W_k * x) + const`, with `W_k` the conv's `[kh, kw, C_in]` kernel of
that channel and `sigma_k = sqrt(running var_k)`. Its upper bound on the channel
Lipschitz constant (UCLC) is the largest singular value of `W_k` reshaped to
`[C_in, kh * kw]`, times `|gamma_k| / sigma_k`. In each such layer the channels whose
UCLC exceeds `mean + u * std` of the layer's UCLCs (the sample standard deviation, as
torch's `std`) are pruned by zeroing their batch-norm scale and bias, so the channel
outputs 0 before the activation. Default u = 3 (the authors' CIFAR-10 setting and
BackdoorBench's config/defense/clp).

Which conv feeds which batch norm is read from one traced forward pass (`conv_bn_pairs`):
a batch norm whose input is exactly a conv's output. That is every `ConvBN` and the inner
norm of a pre-activation block; a block's first norm takes the previous residual sum, so
it has no single conv and no bound (except after the stem conv, which feeds it directly).

References:
  Zheng, Zhang, Wang, Sun and Li, "Data-free Backdoor Removal based on Channel
  Lipschitzness", ECCV 2022.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from linfjax import settings as settings_lib
from linfjax.defenses import bn
from linfjax.defenses.base import Defense, Inputs, Record
from linfjax.settings import number, spec

U = 3.0  # CLP's threshold in standard deviations above the layer's mean UCLC.


def conv_bn_pairs(model: nn.Module, variables, image_shape) -> tuple[tuple[str, str], ...]:
  """(conv, batch norm) layer names where the norm's input is the conv's output.

  Names are module paths joined with "/" (the batch norm's is its `bn.layer_names` name);
  found by tracing one forward pass on zeros of `image_shape` (H, W, C), no compute.
  """
  conv_outputs, pairs = [], []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      name = "/".join(context.module.path)
      if isinstance(context.module, nn.Conv):
        conv_outputs.append((name, out))
      elif isinstance(context.module, nn.BatchNorm) and args:
        pairs.extend((conv, name) for conv, value in conv_outputs if value is args[0])
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, *image_shape), jnp.float32)),
                   variables)
  return tuple(pairs)


def _conv_kernel(variables, conv: str) -> jax.Array:
  node = variables["params"]
  for part in conv.split("/"):
    node = node[part]
  return node["kernel"]


def channel_lipschitz(variables, pairs) -> dict[str, np.ndarray]:
  """The UCLC of every channel of every paired batch norm: {bn layer: float64 [K]}."""
  bounds = {}
  for conv, norm in pairs:
    kernel = np.asarray(_conv_kernel(variables, conv), np.float64)  # [kh, kw, C_in, K]
    per_channel = np.moveaxis(kernel.reshape(-1, kernel.shape[2], kernel.shape[3]), -1, 0)
    largest = np.linalg.svd(per_channel, compute_uv=False)[:, 0]  # [K]
    gain = np.abs(np.asarray(bn.scale(variables, norm), np.float64)) / np.sqrt(
        np.asarray(bn.running_var(variables, norm), np.float64))
    bounds[norm] = largest * gain
  return bounds


def keep_within(bounds: Mapping[str, np.ndarray], u: float = U) -> dict[str, np.ndarray]:
  """{bn layer: float32 [K]}: 0 where UCLC > mean + u * std (ddof 1) of its layer, else 1."""
  keep = {}
  for name, values in bounds.items():
    values = np.asarray(values, np.float64)
    spread = values.std(ddof=1) if values.size > 1 else 0.0
    keep[name] = (values <= values.mean() + u * spread).astype(np.float32)
  return keep


def pruned_variables(variables, keep: Mapping[str, np.ndarray]) -> dict:
  """CLP's pruning: batch-norm scale and bias of every pruned channel set to 0."""
  factors = {name: jnp.asarray(k) for name, k in keep.items()}
  return bn.rescale(variables, factors, factors)


def defend(model: nn.Module, variables, image_shape, *, u: float = U):
  """CLP end to end: (pruned variables, keep-dict {bn layer: [K]}, UCLCs)."""
  bounds = channel_lipschitz(variables, conv_bn_pairs(model, variables, image_shape))
  keep = keep_within(bounds, u)
  return pruned_variables(variables, keep), keep, bounds


@dataclasses.dataclass(frozen=True)
class Settings(settings_lib.Settings):
  """The `prune.clp` block."""
  u: float = spec(U, number(0.0, 100.0),
                  "CLP prunes channels above mean + u * std of their layer.")


def _run(inputs: Inputs, values: Settings) -> Record:
  defended, keep, _ = defend(inputs.model, inputs.variables, inputs.images.shape[1:], u=values.u)
  return Record(pruned=int(sum(np.sum(k == 0) for k in keep.values())), variables=defended,
                details={"u": values.u, "data": "none (data-free)"})


CLP = Defense(run=_run, from_config=lambda prune: Settings.from_config(prune.clp),
              needs_trigger=False, blocks={"clp": Settings},
              cost=lambda work: 2.0 * (work.clean_set + work.test),
              description="CLP: channels with outlying Lipschitz upper bounds pruned, data-free")
