"""The attacks against the defenses: patch, blend, SIG and WaNet x 3 seeds on the quick setting,
with linf pruning (synthetic trigger), Fine-Pruning, ANP, CLP and Neural Cleanse unlearning.

  python -m linfjax.main --config=configs/grid_attacks.py --workdir=runs/grid_attacks
The table, mean and 95 % CI over the seeds per trigger and defense: runs/grid_attacks/
grid_report.html ("Before pruning", and "After pruning, synthetic trigger" with a row per
defense), and aggregates.csv.
Every trigger poisons 8 % of the training images (SIG's quick rate, clean-label as
published; configs/cifar_sig.py says why), so the rate does not differ across the table.
The baselines' rows are `prune.synthetic.{anp,clp,nc_unlearning}` in each run's results.
"""

from linfjax import config as config_lib
from linfjax import defenses


def get_config(variant: str = "quick"):
  config = config_lib.apply_variant(config_lib.base_config(), variant)
  config.trigger.update(config_lib.TRIGGER_PRESETS["patch"])
  config.poison.rate = 0.08
  config.prune.defenses = defenses.DEFAULT_SYNTHETIC + defenses.BASELINES
  config.sweep.axes = "trigger=patch,blend,sig,wanet seed=0,1,2"
  return config
