"""Fine-Pruning: prune layer L's least active neurons on clean data, then fine-tune on S.

Neurons are ranked by their mean activation over S and over the map (smallest, the dormant
ones, first) and pruned, as channel masks, level by level; the chosen level's model is then
fine-tuned on S with its mask fixed. Only S numbers choose; the trigger only with
`level="defender_asr"`.

Where it follows which reference (checked against the authors' github.com/kangliucn/
Fine-pruning-defense face/conv_output_prune.py at 4f181c1 and BackdoorBench's defense/fp.py
with config/defense/fp/config.yaml at f02e353):
  - Score (`prune.fine_pruning.score`): "mean" (default), the signed mean activation, as both
    rank: the authors `np.mean` of pool3 (after a ReLU), BackdoorBench the mean over S of the
    input of the model's last child (for its PreActResNet-18 the pooled residual sum of
    layer4, which has no ReLU, so the sign matters). "mean_abs", the mean |activation| (the
    l1 norm per map over H' W'), is linfjax's former score, kept as an option.
  - Stopping rule (`level`): "ca_drop" (default) prunes until the CA drop on S exceeds
    `prune.delta` points and keeps the level before (the paper's rule, absolute points);
    "relative_ca_drop" keeps pruning while `|CA - CA_0| / CA_0 < ratio` (BackdoorBench's
    `acc_ratio` 0.1, the default `ratio`) and keeps the last level that passed; "defender_asr"
    chooses by the lp defenses' r* rule on the defender's trigger (ours).
  - Levels (`grid`): "levels" (default) sweeps `prune.levels`; "once_prune_ratio" sweeps
    BackdoorBench's grid, `num_pruned` in `range(0, K, ceil(K * once_prune_ratio))`
    (`once_prune_ratio` 0.01) with `num_pruned - 1` neurons pruned at each, as fp.py's
    `seq_sort[0:num_pruned - 1]` does. The authors' script prunes a fixed 48 of 60 conv3
    channels (no sweep).
Differences kept: the layer is `prune.layer` (BackdoorBench masks the last layer's pooled
features, the same as masking linfjax's default probe of PreActResNet-18); BackdoorBench
measures its stopping rule on the test split, linfjax on S; BackdoorBench averages the
activations over randomly cropped and flipped images, linfjax over S as it is; fine-tuning
is `prune.fine_tune`'s (BackdoorBench: 100 epochs, lr 0.01, cosine, batch 256).

References:
  Liu et al., "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
  Networks", RAID 2018.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from jax.typing import ArrayLike

from linfjax import settings
from linfjax.defenses import fine_tuning, lp_pruning, pruning
from linfjax.defenses.base import Curve, Defense, Inputs, Record
from linfjax.settings import choice, number, spec

LEVEL_RULES = ("ca_drop", "relative_ca_drop", "defender_asr")
SCORES = ("mean", "mean_abs")
GRIDS = ("levels", "once_prune_ratio")


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The `prune.fine_pruning` block."""
  level: str = spec("ca_drop", choice(*LEVEL_RULES),
                    '"ca_drop": prune until the CA drop on S exceeds delta points (as '
                    'published); "relative_ca_drop": while the relative CA change on S is '
                    'below ratio (BackdoorBench fp.py); "defender_asr": the lp methods\' rule.')
  ratio: float = spec(0.1, number(0.0, 1.0, low_open=True),
                      "relative_ca_drop's tolerance (BackdoorBench's acc_ratio 0.1).")
  score: str = spec("mean", choice(*SCORES),
                    '"mean": the signed mean activation on S (both references); "mean_abs": '
                    "the mean absolute activation (linfjax's former score).")
  grid: str = spec("levels", choice(*GRIDS),
                   '"levels": prune.levels; "once_prune_ratio": BackdoorBench fp.py\'s steps '
                   "of ceil(K * once_prune_ratio), one neuron fewer at each.")
  once_prune_ratio: float = spec(0.01, number(0.0, 1.0, low_open=True),
                                 "The once_prune_ratio grid's step (BackdoorBench's 0.01).")


def once_prune_ratio_counts(num_neurons: int, once_prune_ratio: float) -> np.ndarray:
  """BackdoorBench fp.py's levels: for `num_pruned` in `range(0, K, ceil(K * ratio))` it
  prunes `seq_sort[0:num_pruned - 1]`, i.e. `num_pruned - 1` neurons (0 at the first).

  Returns:
    int64 distinct counts, ascending, starting with 0.
  """
  step = math.ceil(num_neurons * once_prune_ratio)
  counts = np.maximum(np.arange(0, num_neurons, step) - 1, 0)
  return np.unique(counts).astype(np.int64)


def relative_ca_drop_level(ca_clean_set: ArrayLike, *, ca_reference: float,
                           ratio: float) -> int:
  """BackdoorBench fp.py's stopping rule on a sweep from least to most pruned.

  A level passes while `|CA - ca_reference| / ca_reference < ratio`; pruning stops at the
  first level that does not, and the last level that passed is kept.

  Returns:
    That level's index (the last level when every level passes; 0 when `ca_reference` is 0,
    where the ratio is undefined).
  """
  ca = np.asarray(ca_clean_set, np.float64)
  if ca_reference <= 0:
    return 0
  over = np.flatnonzero(~(np.abs(ca - ca_reference) / ca_reference < ratio))
  return int(over[0] - 1) if len(over) else len(ca) - 1


def _sweep(inputs: Inputs, shared: pruning.Settings, own: Settings, order) -> Curve:
  counts = None
  if own.grid == "once_prune_ratio":
    counts = once_prune_ratio_counts(len(order), own.once_prune_ratio)
  return lp_pruning.sweep_order(inputs, shared, order, "prune fine_pruning", counts)


def run(inputs: Inputs, values) -> Record:
  shared, own, tuning = values
  moments = inputs.statistics()[inputs.layer]
  activity = pruning.clean_mean_activation(moments, map_size=inputs.map_size(inputs.layer),
                                           score=own.score)
  order = pruning.ranking(activity, largest_first=False)
  curve = _sweep(inputs, shared, own, order)
  ca = curve.clean_set["CA_S"]
  if own.level == "ca_drop":
    curve.chosen = pruning.fine_pruning_level(ca, ca_reference=ca[0], delta=shared.delta)
  elif own.level == "relative_ca_drop":
    curve.chosen = relative_ca_drop_level(ca, ca_reference=ca[0], ratio=own.ratio)
  masks = {layer: stack[curve.chosen] for layer, stack in curve.masks.items()}
  return Record(pruned=int(curve.pruned[curve.chosen]), masks=masks, curve=curve,
                variables=fine_tuning.tuned(inputs, masks, tuning),
                details={"order": order.tolist(), "level": int(curve.chosen),
                         "rule": own.level, "score": own.score, "grid": own.grid,
                         **({"ratio": own.ratio} if own.level == "relative_ca_drop" else {}),
                         "chosen_on": "S"})


FINE_PRUNING = Defense(
    run=run, needs_trigger=False,
    from_config=lambda prune: (pruning.Settings.from_config(prune),
                               Settings.from_config(prune.fine_pruning),
                               fine_tuning.Settings.from_config(prune.fine_tune)),
    cost=lambda work: lp_pruning.sweep_cost(work) + fine_tuning.tuning_cost(work),
    blocks={"": pruning.Settings, "fine_pruning": Settings, "fine_tune": fine_tuning.Settings},
    description="Fine-Pruning: the least active neurons of L pruned, then fine-tuned on S "
                "(the trigger only chooses its level when level='defender_asr')")
