"""The paper's setting: GTSRB (43 traffic-sign classes) with an AlexNet-style network.

BadNets' 3x3 white patch at the bottom-right, target 0, poison rate 0.1; GTSRB as its
official archives unpack (`data.source="gtsrb"`, 32x32, no flips, S held out by track: see
configs/gtsrb_patch.py). The full variant is BackdoorBench's GTSRB recipe (SGD lr 0.01,
momentum 0.9, weight decay 5e-4, cosine decay, batch 128, 50 epochs), a GPU job:
  python -m linfjax.main --config=configs/gtsrb_alexnet.py --workdir=runs/gtsrb_alexnet \\
      --config.data.path=DIR        # DIR from `python -m linfjax.fetch gtsrb DIR`
Quick: the same network at half width (`config.use_gtsrb_alexnet` says why) on
../shared/data/gtsrb32 with the quick settings, 2 epochs, every stage and every defense
(about 50 min on 2 CPU cores; docs/results.md):
  python -m linfjax.main --config=configs/gtsrb_alexnet.py:quick --workdir=runs/alexnet_quick
"""

from linfjax import config as config_lib


def get_config(variant: str = ""):
  return config_lib.gtsrb_patch(variant, network="alexnet")
