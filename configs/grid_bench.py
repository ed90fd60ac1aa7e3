"""The bench: every attack of the registry against every defense, 3 seeds, CIFAR-10 quick.

  python -m linfjax.main --config=configs/grid_bench.py --workdir=runs/grid_bench
  python -m linfjax.reports.defense_table runs/grid_bench --bench
The second command prints the table (a row per attack, a column per defense: CA / ASR / DER
after it, mean over the seeds finished) and writes it with heat maps to runs/grid_bench/
(defense_table.md, defense_table.html, figures/heatmap.*.png); a cell without a number says
why (missing, or the reason results.json gives). It can be run at any time: while the grid
is incomplete the table names the missing cells.
The grid is one run per attack preset (`linfjax.attacks.PRESETS`, the axis trigger=NAME) and
seed 0, 1, 2, each training a backdoored and a vanilla model, Neural Cleanse and every defense
of `linfjax.defenses.DEFAULT_SYNTHETIC` and `BASELINES` (new ones join both axes by
themselves). It takes hours on 2 CPU cores; a killed grid resumes where it stopped when the
same command is run again (`--shard=I/N` splits it among processes, linfjax/runs/sweep.py).
Every attack poisons 8 % of the training images (SIG's quick rate, clean-label as published).
Each run also trains ABL's model (the training-time defense, its column "abl").
"""

from linfjax import attacks, defenses
from linfjax import config as config_lib


def get_config(variant: str = "quick"):
  config = config_lib.apply_variant(config_lib.base_config(), variant)
  config.trigger.update(attacks.PRESETS["patch"])
  config.poison.rate = 0.08
  config.prune.defenses = tuple(dict.fromkeys(defenses.DEFAULT_SYNTHETIC + defenses.BASELINES))
  config.abl.enabled = True
  config.sweep.axes = f"trigger={','.join(attacks.PRESETS)} seed=0,1,2"
  return config
