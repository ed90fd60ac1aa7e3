"""ANP's pruning by mask value: by threshold or count, and BackdoorBench's sweep and choice.

The mask values come from `anp.learn_masks`; a keep-dict {batch-norm layer: float32 [K]} is
0 on the pruned neurons, whose batch-norm scale is then set to 0 (bias kept), as both the
authors' prune_neuron_cifar.py and BackdoorBench's defense/anp.py `pruning` do. Neurons are
ordered by value, ties in layer then neuron order (a stable sort, as their `sorted`).

References:
  Wu and Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from linfjax.defenses import bn

THRESHOLD = 0.2  # ANP's pruning threshold on the mask values (the paper's).


def as_written(values: Mapping[str, np.ndarray], decimals: int = 4) -> dict:
  """Mask values rounded to `decimals` in float64, as both references prune them after
  writing mask_values.txt with '{:.4f}' and reading it back."""
  return {name: np.round(np.asarray(v, np.float64), decimals) for name, v in values.items()}


def keep_above(values: Mapping[str, np.ndarray], threshold: float = THRESHOLD) -> dict:
  """Pruning by threshold: {layer: float32 [K]}, 0 where the mask value is <= threshold."""
  return {name: (np.asarray(v) > threshold).astype(np.float32) for name, v in values.items()}


def keep_all_but_smallest(values: Mapping[str, np.ndarray], count: int) -> dict:
  """Pruning by count: 0 for the `count` smallest mask values over all layers (ties in layer,
  then neuron order), 1 elsewhere."""
  names = list(values)
  flat = np.concatenate([np.asarray(values[name], np.float64) for name in names])
  if not 0 <= count <= flat.size:
    raise ValueError(f"cannot prune {count} of {flat.size} batch-norm neurons")
  keep = np.ones(flat.size, np.float32)
  keep[np.argsort(flat, kind="stable")[:count]] = 0.0
  splits = np.cumsum([np.asarray(values[name]).size for name in names])[:-1]
  return dict(zip(names, np.split(keep, splits)))


def pruned_variables(variables, keep: Mapping[str, np.ndarray]) -> dict:
  """ANP's pruning: the batch-norm scale of every pruned neuron set to 0, its bias kept."""
  return bn.rescale(variables, {name: jnp.asarray(k) for name, k in keep.items()})


def num_pruned(keep: Mapping[str, np.ndarray]) -> int:
  """How many neurons a keep-dict prunes."""
  return int(sum(np.sum(np.asarray(k) == 0) for k in keep.values()))


def sweep_levels(values: Mapping[str, np.ndarray], *, pruning_by: str, pruning_max: float,
                 pruning_step: float) -> tuple[np.ndarray, list[dict]]:
  """BackdoorBench anp.py's levels (`evaluate_by_threshold` / `evaluate_by_number`).

  Returns:
    (thresholds or counts [M], M keep-dicts); each level prunes the neurons with mask value
    <= its threshold (0, step, ..., max as `np.arange(0, max + step, step)`), or the
    `start + ceil(step)` smallest for `start` in `range(0, ceil(max) + 1, ceil(step))`
    (at most all of them).
  """
  if pruning_by == "threshold":
    thresholds = np.arange(0, pruning_max + pruning_step, pruning_step)
    return thresholds, [keep_above(values, t) for t in thresholds]
  total = sum(np.asarray(v).size for v in values.values())
  step = math.ceil(pruning_step)
  counts = np.minimum(np.arange(0, math.ceil(pruning_max) + 1, step) + step, total)
  return counts, [keep_all_but_smallest(values, int(c)) for c in counts]


def choose_level(ca: Sequence[float], asr: Sequence[float], *, ca_reference: float,
                 asr_reference: float, acc_ratio: float) -> int:
  """BackdoorBench anp.py's choice among swept levels (least to most pruned).

  Returns:
    The level of lowest ASR, strictly below `asr_reference` (the unpruned model's) and below
    every earlier level's, among those with `|CA - ca_reference| / ca_reference < acc_ratio`;
    -1 (the unpruned model) when none qualifies or `ca_reference` is 0.
  """
  best, best_asr = -1, asr_reference
  if ca_reference <= 0:
    return best
  for i, (level_ca, level_asr) in enumerate(zip(ca, asr)):
    if abs(level_ca - ca_reference) / ca_reference < acc_ratio and level_asr < best_asr:
      best, best_asr = i, level_asr
  return best
