"""The paper's network on the paper's data: GTSRB with the AlexNet-style net, quick, 2 seeds.

  python -m linfjax.main --config=configs/grid_gtsrb_alexnet.py --workdir=runs/grid_alexnet
(configs/gtsrb_alexnet.py says what the quick variant is.) The tables:
  python -m linfjax.reports.summarize runs/grid_alexnet/runs/*
"""

from linfjax import config as config_lib


def get_config(variant: str = "quick"):
  config = config_lib.gtsrb_patch(variant, network="alexnet")
  config.sweep.axes = "seed=0,1"
  return config
