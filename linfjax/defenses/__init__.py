"""Backdoor defenses: pruning as a mask transform, and the baselines, as one-file plug-ins.

    record = defenses.DEFENSES["linf"].run(inputs, settings)   # masks and/or new variables

Each defense is a function of the backdoored model, its variables, the clean set S, the
defender's trigger (or none) and its settings, returning a `Record` (linfjax/defenses/base.py);
`DEFENSES` names them as configs (`prune.defenses`) and results.json do. A new defense is one
module, one line here and its test.
"""

from __future__ import annotations

import dataclasses

from linfjax import settings
from linfjax.defenses import anp, clp, fine_pruning, fine_tuning, lp_pruning, multi_layer
from linfjax.defenses import ft_sam, ibau, nad, nc_unlearning, rnp, sau
from linfjax.defenses.base import Curve, Defense, Inputs, Record, Work

DEFENSES: dict[str, Defense] = {
    # The paper's defense under each norm, and each then fine-tuned on S (ours).
    "linf": lp_pruning.LINF,
    "linf_ft": fine_tuning.then_fine_tune(lp_pruning.LINF, "linf"),
    "l2": lp_pruning.L2,
    "l2_ft": fine_tuning.then_fine_tune(lp_pruning.L2, "l2"),
    "l1": lp_pruning.L1,
    "l1_ft": fine_tuning.then_fine_tune(lp_pruning.L1, "l1"),
    "fine_pruning": fine_pruning.FINE_PRUNING,
    # Beyond the paper (ours): several layers at once.
    "linf_layers": multi_layer.LINF_LAYERS,
    "linf_layers_ft": fine_tuning.then_fine_tune(multi_layer.LINF_LAYERS, "linf_layers"),
    "l2_layers": multi_layer.L2_LAYERS,
    "l2_layers_ft": fine_tuning.then_fine_tune(multi_layer.L2_LAYERS, "l2_layers"),
    "l1_layers": multi_layer.L1_LAYERS,
    "l1_layers_ft": fine_tuning.then_fine_tune(multi_layer.L1_LAYERS, "l1_layers"),
    "fine_tuning": fine_tuning.FINE_TUNING,
    # Baselines.
    "anp": anp.ANP,
    "clp": clp.CLP,
    "nc_unlearning": nc_unlearning.NC_UNLEARNING,
    "nad": nad.NAD,
    "ft_sam": ft_sam.FT_SAM,
    "rnp": rnp.RNP,
    "sau": sau.SAU,
    "ibau": ibau.IBAU,
}
# What a run defends with by default: for the synthetic trigger, the paper's rows, their
# fine-tuned models, several layers and the fine-tuning control; for the real trigger
# (analysis only), the paper's rows and Fine-Pruning.
DEFAULT_SYNTHETIC = ("linf", "linf_ft", "l2", "l2_ft", "l1", "l1_ft", "fine_pruning",
                     "linf_layers", "linf_layers_ft", "fine_tuning")
DEFAULT_REAL = ("linf", "l2", "l1", "fine_pruning")
BASELINES = ("anp", "clp", "nc_unlearning", "nad", "ft_sam", "rnp", "sau", "ibau")


@dataclasses.dataclass(frozen=True)
class Choice(settings.Settings):
  """The `prune` block's choice of defenses (their own settings are its sub-blocks)."""
  defenses: tuple = settings.spec(DEFAULT_SYNTHETIC, settings.names(DEFENSES),
                                  "Defenses run with the synthetic trigger, in order.")
  real_defenses: tuple = settings.spec(DEFAULT_REAL, settings.names(DEFENSES),
                                       "Defenses run with the real trigger (analysis only).")


def blocks() -> dict[str, type]:
  """Every `prune.<name>` block the defenses declare ('' is the `prune` block itself)."""
  found: dict[str, type] = {}
  for defense in DEFENSES.values():
    for name, owner in defense.blocks.items():
      if found.setdefault(name, owner) is not owner:
        raise ValueError(f"two settings classes declare the block prune.{name}")
  return found


__all__ = ["BASELINES", "Choice", "Curve", "DEFAULT_REAL", "DEFAULT_SYNTHETIC", "DEFENSES", "Defense",
           "Inputs", "Record", "Work", "blocks"]
