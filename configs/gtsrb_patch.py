"""The paper's data: GTSRB (43 traffic-sign classes) with BadNets' 3x3 white patch at the
bottom-right, target class 0, poison rate 0.1.

GTSRB is read as its official archives unpack (`data.source="gtsrb"`: the CSV labels, images
resized to 32x32, no horizontal flips), and the defender's clean set S is held out by track:
one 30-frame track of each class (1,290 images), so no physical sign has frames both in
training and in S.

Quick run (the small CNN on the whole of GTSRB in ../shared/data/gtsrb32, 3 epochs, every
stage and every defense, 33.6-35.6 min on 2 CPU cores, docs/results.md):
  python -m linfjax.main --config=configs/gtsrb_patch.py:quick --workdir=runs/gtsrb_quick
Full run (PreActResNet-18, BackdoorBench's recipe, 50 epochs; a GPU job; DIR from
`python -m linfjax.fetch gtsrb DIR`):
  python -m linfjax.main --config=configs/gtsrb_patch.py --workdir=runs/gtsrb \\
      --config.data.path=DIR
"""

from linfjax import config as config_lib


def get_config(variant: str = ""):
  return config_lib.gtsrb_patch(variant)
