"""The paper's defense: prune the neurons of layer L whose lp norm the defender's trigger inflates.

On the defender's clean set S, each neuron `k` of L is scored by the shift of its lp norm
under the trigger, `delta_k = mean ||A_k(T^(x))||_p - mean ||A_k(x)||_p` (or the triggered
norm itself, `score="triggered"`), ranked largest first, and the levels of `prune.levels`
zero the top neurons as channel masks (weights untouched). Every level is evaluated on S in
one vmapped sweep; r* is the smallest level whose defender-side ASR is at most `tau` with the
CA drop on S at most `delta`, else the lowest defender-side ASR within that drop. `linf`,
`l2` and `l1` are the same defense under three norms: the paper's comparison.

References:
  Xu et al., "Defending against Backdoor Attack on Deep Neural Networks", arXiv 2002.12162.
"""

from __future__ import annotations

import functools

import numpy as np

from linfjax.defenses import pruning
from linfjax.defenses.base import Curve, Defense, Inputs, Record, Work

NORMS = ("linf", "l2", "l1")


def sweep_order(inputs: Inputs, values: pruning.Settings, order: np.ndarray, desc: str,
                counts: np.ndarray | None = None) -> Curve:
  """The levels of `values` (or the neuron `counts` given, 0 first) along a pruning order,
  swept on S, with docs/method.md's r* chosen."""
  layer = inputs.layer
  if counts is None:
    counts = pruning.level_counts(tuple(values.levels), len(order), unit=values.level_unit)
  stack = pruning.masks(order, counts)
  numbers = inputs.clean_set_sweep({layer: stack}, mask_batch=values.mask_batch, desc=desc)
  chosen = pruning.choose_level(numbers["ASR_defender"], numbers["CA_S"],
                                ca_reference=numbers["CA_S"][0], tau=values.tau,
                                delta=values.delta)
  return Curve({layer: stack}, counts, counts / len(order), numbers, chosen)


def prune_by_norm(inputs: Inputs, values: pruning.Settings, *, norm: str) -> Record:
  """Layer L pruned by the trigger's shift of each neuron's `norm` (see the module doc)."""
  moments = inputs.statistics()[inputs.layer]
  scores = pruning.scores_from_moments(moments, norm=norm, score=values.score)
  order = pruning.ranking(scores)
  curve = sweep_order(inputs, values, order, f"prune {norm}")
  return Record(pruned=int(curve.pruned[curve.chosen]),
                masks={layer: stack[curve.chosen] for layer, stack in curve.masks.items()},
                curve=curve,
                details={"norm": norm, "score": values.score, "order": order.tolist(),
                         "level": int(curve.chosen), "chosen_on": "S"})


def sweep_cost(work: Work) -> float:
  """A sweep's passes: S clean and triggered, then the test split likewise for the report."""
  return 2.0 * (work.clean_set + work.test)


def _entry(norm: str) -> Defense:
  return Defense(run=functools.partial(prune_by_norm, norm=norm),
                 from_config=pruning.Settings.from_config, needs_trigger=True, cost=sweep_cost,
                 description=f"the paper's pruning of layer L by the trigger's {norm} shift",
                 blocks={"": pruning.Settings})


LINF = _entry("linf")
L2 = _entry("l2")
L1 = _entry("l1")
