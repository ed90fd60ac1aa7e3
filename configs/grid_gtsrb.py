"""The paper's experiment on its own data: GTSRB quick (configs/gtsrb_patch.py:quick), 6 seeds.

  python -m linfjax.main --config=configs/grid_gtsrb.py --workdir=runs/grid_gtsrb
Each run trains a backdoored and a vanilla small CNN on the whole of GTSRB, runs Neural
Cleanse over the 43 classes on both, the analysis, and every defense. The tables:
  python -m linfjax.reports.summarize runs/grid_gtsrb/runs/*
  python -m linfjax.reports.defense_table runs/grid_gtsrb
"""

from linfjax import config as config_lib


def get_config(variant: str = "quick"):
  config = config_lib.gtsrb_patch(variant)
  config.sweep.axes = "seed=0,1,2,3,4,5"
  return config
