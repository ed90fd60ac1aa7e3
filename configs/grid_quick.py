"""A grid on the quick setting: 2 triggers x 2 poison rates x 3 seeds, 12 runs in one process.

  python -m linfjax.main --config=configs/grid_quick.py --workdir=runs/grid_quick
Change the axes from the command line, e.g. a smaller grid:
  python -m linfjax.main --config=configs/grid_quick.py \
      --config.sweep.axes="poison.rate=0.05,0.1 seed=0" --workdir=runs/grid_small
Each run is a complete run directory, runs/grid_quick/runs/<name>/; the grid report is
runs/grid_quick/grid_report.html (rebuild it with `python -m linfjax.reports.grid_report DIR`).
"""

from linfjax import config as config_lib


def get_config(variant: str = "quick"):
  config = config_lib.apply_variant(config_lib.base_config(), variant)
  config.trigger.update(config_lib.TRIGGER_PRESETS["patch"])
  config.sweep.axes = "trigger=patch,blend poison.rate=0.05,0.1 seed=0,1,2"
  return config
