"""Pruning several layers at once (ours, beyond the paper): each layer ranked by its own shift,
or all neurons of the layers ranked together by their relative shift.

`<norm>_layers` sweeps fractions of the layers' neurons on S (one mask per layer per level)
and chooses the level by the lp rule; the report evaluates the chosen model on the test split.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import numpy as np

from linfjax import models, settings
from linfjax.defenses import pruning
from linfjax.defenses.base import Curve, Defense, Inputs, Record
from linfjax.detection import norms
from linfjax.settings import choice, described, spec

MULTI_LAYER_RANKINGS = ("per_layer", "joint")



def relative_shifts(moments: norms.Moments, *, norm: str, condition: int = 0,
                    norm_names: Sequence[str] = norms.NORMS) -> np.ndarray:
  """`delta_k / mean_x ||A_k(x)||_p`: each neuron's shift in units of its own clean norm, which
  compares across layers (ours, for ranking several layers jointly). The denominator is
  floored at `norms.REL_FLOOR` times the layer's mean clean norm, as for docs/method.md's `rel`.

  Returns:
    [K] float64.
  """
  index = list(norm_names).index(norm)
  clean = np.asarray(moments.mean[0, index], np.float64)
  floor = max(norms.REL_FLOOR * float(np.mean(clean)), np.finfo(np.float32).tiny)
  return pruning.scores_from_moments(moments, norm=norm, condition=condition,
                             norm_names=norm_names) / np.maximum(clean, floor)


def multi_layer_masks(scores: Mapping[str, np.ndarray], fractions: Sequence[float], *,
                      scope: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Masks that prune several layers at once, one pruned model per fraction.

  Args:
    scores: layer -> [K_layer] scores, larger more suspect (per layer: `delta_k`; jointly:
      `relative_shifts`, which compare across layers).
    fractions: [levels] fractions in [0, 1), ascending, of each layer's neurons
      ("per_layer") or of all the layers' neurons together ("joint").
    scope: "per_layer" prunes the top fraction of every layer by its own ranking;
      "joint" ranks all neurons of all layers together and prunes the top fraction.

  Returns:
    (int64 [levels] neurons pruned in all, layer -> float32 [levels, K_layer] masks).
  """
  if scope not in MULTI_LAYER_RANKINGS:
    raise ValueError(f"unknown multi-layer ranking {scope!r}; known: "
                     f"{', '.join(MULTI_LAYER_RANKINGS)}")
  fractions = np.asarray(fractions, np.float64)
  layers = list(scores)
  if scope == "per_layer":
    stacks = {layer: pruning.masks(pruning.ranking(values),
                                   np.floor(fractions * len(values) + 0.5))
              for layer, values in scores.items()}
  else:
    joined = np.concatenate([np.asarray(scores[layer], np.float64) for layer in layers])
    total = pruning.masks(pruning.ranking(joined), np.floor(fractions * len(joined) + 0.5))
    bounds = np.cumsum([0] + [len(scores[layer]) for layer in layers])
    stacks = {layer: total[:, bounds[i]:bounds[i + 1]] for i, layer in enumerate(layers)}
  pruned = sum((stack == 0).sum(axis=1) for stack in stacks.values()).astype(np.int64)
  return pruned, stacks


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The `prune.layers` block."""
  ranking: str = spec("joint", choice(*MULTI_LAYER_RANKINGS),
                      '"per_layer": each layer ranked by its own shift; "joint": all neurons '
                      "ranked by their relative shift.")
  layers: tuple = spec((), described("layer names of the model; empty: every layer"),
                       "The layers pruned together; empty: every layer of the model.")
  levels: tuple = spec((0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12, 0.15,
                        0.2, 0.25, 0.3),
                       described("distinct increasing fractions in (0, 1)"),
                       "Fractions of the layers' neurons; 0 (nothing pruned) is always added.")

  def check(self, prefix: str) -> None:
    levels = tuple(self.levels)
    if not levels or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                             and 0 < v < 1 for v in levels) or list(levels) != sorted(set(levels)):
      settings.fail(f"{prefix}.levels", f"must be distinct increasing fractions in (0, 1), got "
                    f"{levels!r}")


def pruned_layers(model, values: Settings) -> tuple[str, ...]:
  """The layers a multi-layer defense prunes."""
  return tuple(values.layers) or models.layer_names(model)


def run(inputs: Inputs, both, *, norm: str) -> Record:
  shared, values = both
  statistics = inputs.statistics()
  layers = pruned_layers(inputs.model, values)
  if values.ranking == "joint":
    scores = {layer: relative_shifts(statistics[layer], norm=norm) for layer in layers}
  else:
    scores = {layer: pruning.scores_from_moments(statistics[layer], norm=norm,
                                                 score=shared.score) for layer in layers}
  fractions = np.asarray((0.0,) + tuple(values.levels))
  pruned, stacks = multi_layer_masks(scores, fractions, scope=values.ranking)
  numbers = inputs.clean_set_sweep(stacks, mask_batch=1, desc=f"prune {norm} layers")
  chosen = pruning.choose_level(numbers["ASR_defender"], numbers["CA_S"],
                                ca_reference=numbers["CA_S"][0], tau=shared.tau,
                                delta=shared.delta)
  curve = Curve(stacks, pruned, fractions, numbers, chosen, test=False)
  return Record(pruned=int(pruned[chosen]),
                masks={layer: stack[chosen] for layer, stack in stacks.items()}, curve=curve,
                details={"norm": norm, "ranking": values.ranking, "layers": list(layers),
                         "level": int(chosen), "chosen_on": "S",
                         "scores": {layer: s.tolist() for layer, s in scores.items()}})


def _entry(norm: str) -> Defense:
  return Defense(
      run=functools.partial(run, norm=norm), needs_trigger=True,
      from_config=lambda prune: (pruning.Settings.from_config(prune),
                                 Settings.from_config(prune.layers)),
      cost=lambda work: 2.0 * work.clean_set * 16 + 2.0 * (work.clean_set + work.test),
      blocks={"": pruning.Settings, "layers": Settings},
      layers=lambda model, prune: pruned_layers(model, Settings.from_config(prune.layers)),
      description=f"several layers pruned at once by the trigger's {norm} shift (ours)")


LINF_LAYERS = _entry("linf")
L2_LAYERS = _entry("l2")
L1_LAYERS = _entry("l1")
