"""Channel Lipschitzness-based Pruning (CLP): data-free, from the conv and batch-norm weights.

For a batch norm paired with a convolution, channel `k` computes
`gamma_k / sigma_k * (W_k * x) + const`, with `W_k` the conv's `[kh, kw, C_in]` kernel of
that channel and `sigma_k = sqrt(running var_k)`. Its upper bound on the channel
Lipschitz constant (UCLC) is the largest singular value of `W_k` reshaped to
`[C_in, kh * kw]`, times `|gamma_k| / sigma_k`. In each batch norm the channels whose
UCLC exceeds `mean + u * std` of the layer's UCLCs (the sample standard deviation, as
torch's `std`) are pruned by zeroing their batch-norm scale and bias.

Where it follows which reference (checked against the authors' github.com/rkteddy/
channel-Lipschitzness-based-pruning defense.py, function `CLP`, at 5209c83, and
BackdoorBench's defense/clp.py, `CLP_prune`, with config/defense/clp/config.yaml at f02e353):
the bound, the strict `>` against `mean + u * std` (ddof 1), zeroing scale and bias, and
u = 3 (the authors' test.py default and BackdoorBench's `u: 3`; BackdoorBench also sweeps
u over `linspace(u_min, u_max, u_num)` for its logs only, its model is pruned at u).
Both references walk `named_modules()` and pair EVERY batch norm with the last `Conv2d` met
before it in that walk, i.e. in the order the PyTorch model declares its modules
(`pairing="declared"`, the default): on PreActResNet-18 all 16 norms, a block's first norm
(which normalises the previous residual sum) with the previous block's last-declared conv.
BackdoorBench's PreActBlock declares its 1x1 projection shortcut after its second conv, so
the first norm after a downsampling block is paired with that shortcut. linfjax's block calls
the shortcut first; `conv_bn_pairs` traces one forward pass and, for "declared", moves each
projection shortcut (a conv reading the same input as the next conv of its block) to the end
of its block. `pairing="traced"` pairs each norm with the last conv run before it instead
(differs on those 3 norms of PreActResNet-18). On the CNN, VGG and AlexNet (conv, then
norm) both orders give each norm its own conv.

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
from linfjax.settings import choice, number, spec

U = 3.0  # CLP's threshold in standard deviations above the layer's mean UCLC.
PAIRINGS = ("declared", "traced")


def _calls(model: nn.Module, variables, image_shape) -> list[tuple[str, str, object]]:
  """(kind "conv" or "norm", module path joined with "/", its input) of every conv and batch
  norm, in the order one traced forward pass calls them."""
  calls = []

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and args and isinstance(module, (nn.Conv, nn.BatchNorm)):
      calls.append(("conv" if isinstance(module, nn.Conv) else "norm", "/".join(module.path),
                    args[0]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, *image_shape), jnp.float32)),
                   variables)
  return calls


def _declared(calls):
  """`calls` with each projection shortcut (a conv whose input is the input of the next conv
  its block calls) moved after the rest of its block, where a PyTorch block declares it."""
  parent = lambda call: call[1].rpartition("/")[0]
  convs = [i for i, call in enumerate(calls) if call[0] == "conv"]
  shortcuts = {i for i, j in zip(convs, convs[1:])
               if parent(calls[i]) == parent(calls[j]) and calls[i][2] is calls[j][2]}
  last = {parent(call): i for i, call in enumerate(calls) if i not in shortcuts}
  ordered = []
  for i, call in enumerate(calls):
    if i not in shortcuts:
      ordered.append(call)
    if last.get(parent(call)) == i:
      ordered.extend(calls[s] for s in sorted(shortcuts) if parent(calls[s]) == parent(call))
  return ordered


def conv_bn_pairs(model: nn.Module, variables, image_shape, *,
                  pairing: str = "declared") -> tuple[tuple[str, str], ...]:
  """(conv, batch norm) layer names: every batch norm with the last conv before it.

  Args:
    model, variables: the classifier (abstract variables suffice).
    image_shape: (H, W, C); one forward pass on zeros is traced, no compute.
    pairing: "declared" (the references' module order, see the module doc) or "traced" (the
      order the forward pass runs).

  Returns:
    Names are module paths joined with "/" (the norm's is its `bn.layer_names` name); a
    norm with no conv before it has no pair.
  """
  if pairing not in PAIRINGS:
    raise ValueError(f"unknown pairing {pairing!r}; known: {', '.join(PAIRINGS)}")
  calls = _calls(model, variables, image_shape)
  if pairing == "declared":
    calls = _declared(calls)
  pairs, conv = [], None
  for kind, name, _ in calls:
    if kind == "conv":
      conv = name
    elif conv is not None:
      pairs.append((conv, name))
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
    if kernel.shape[-1] != np.shape(bn.scale(variables, norm))[0]:
      raise ValueError(f"conv {conv} has {kernel.shape[-1]} channels, its batch norm {norm} "
                       f"{np.shape(bn.scale(variables, norm))[0]}")
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


def defend(model: nn.Module, variables, image_shape, *, u: float = U,
           pairing: str = "declared"):
  """CLP end to end: (pruned variables, keep-dict {bn layer: [K]}, UCLCs)."""
  bounds = channel_lipschitz(variables, conv_bn_pairs(model, variables, image_shape,
                                                      pairing=pairing))
  keep = keep_within(bounds, u)
  return pruned_variables(variables, keep), keep, bounds


@dataclasses.dataclass(frozen=True)
class Settings(settings_lib.Settings):
  """The `prune.clp` block."""
  u: float = spec(U, number(0.0, 100.0),
                  "CLP prunes channels above mean + u * std of their layer.")
  pairing: str = spec("declared", choice(*PAIRINGS),
                      'Each norm\'s conv: "declared", the last declared before it (the '
                      'references\' named_modules walk); "traced", the last run before it.')


def _run(inputs: Inputs, values: Settings) -> Record:
  defended, keep, _ = defend(inputs.model, inputs.variables, inputs.images.shape[1:],
                             u=values.u, pairing=values.pairing)
  return Record(pruned=int(sum(np.sum(k == 0) for k in keep.values())), variables=defended,
                details={"u": values.u, "pairing": values.pairing, "norms": len(keep),
                         "data": "none (data-free)"})


CLP = Defense(run=_run, from_config=lambda prune: Settings.from_config(prune.clp),
              needs_trigger=False, blocks={"clp": Settings},
              cost=lambda work: 2.0 * (work.clean_set + work.test),
              description="CLP: channels with outlying Lipschitz upper bounds pruned, data-free")
