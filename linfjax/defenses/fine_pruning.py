"""Fine-Pruning: prune layer L's least active neurons on clean data, then fine-tune on S.

Neurons are ranked by their mean activation over S (smallest, the dormant ones, first) and
pruned, as channel masks, until the clean accuracy on S has dropped by more than `delta`
(the level just before; `level="ca_drop"`, as published: no trigger needed); the pruned
model is then fine-tuned on S with its mask fixed. `level="defender_asr"` chooses the level by
the lp defenses' r* rule on the defender's trigger instead (an option, named in results).

References:
  Liu et al., "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
  Networks", RAID 2018.
"""

from __future__ import annotations

import dataclasses

from linfjax import settings
from linfjax.defenses import fine_tuning, lp_pruning, pruning
from linfjax.defenses.base import Defense, Inputs, Record
from linfjax.settings import choice, spec

LEVEL_RULES = ("ca_drop", "defender_asr")


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The `prune.fine_pruning` block."""
  level: str = spec("ca_drop", choice(*LEVEL_RULES),
                    '"ca_drop" prunes until the CA drop on S exceeds delta (as published, no '
                    'trigger needed); "defender_asr" chooses it by the lp methods\' rule.')


def run(inputs: Inputs, values) -> Record:
  shared, own, tuning = values
  moments = inputs.statistics()[inputs.layer]
  activity = pruning.clean_mean_activation(moments, map_size=inputs.map_size(inputs.layer))
  order = pruning.ranking(activity, largest_first=False)
  curve = lp_pruning.sweep_order(inputs, shared, order, "prune fine_pruning")
  if own.level == "ca_drop":
    curve.chosen = pruning.fine_pruning_level(curve.clean_set["CA_S"],
                                              ca_reference=curve.clean_set["CA_S"][0],
                                              delta=shared.delta)
  masks = {layer: stack[curve.chosen] for layer, stack in curve.masks.items()}
  return Record(pruned=int(curve.pruned[curve.chosen]), masks=masks, curve=curve,
                variables=fine_tuning.tuned(inputs, masks, tuning),
                details={"order": order.tolist(), "level": int(curve.chosen),
                         "rule": own.level, "chosen_on": "S"})


FINE_PRUNING = Defense(
    run=run, needs_trigger=False,
    from_config=lambda prune: (pruning.Settings.from_config(prune),
                               Settings.from_config(prune.fine_pruning),
                               fine_tuning.Settings.from_config(prune.fine_tune)),
    cost=lambda work: lp_pruning.sweep_cost(work) + fine_tuning.tuning_cost(work),
    blocks={"": pruning.Settings, "fine_pruning": Settings, "fine_tune": fine_tuning.Settings},
    description="Fine-Pruning: the least active neurons of L pruned, then fine-tuned on S "
                "(the trigger only chooses its level when level='defender_asr')")

