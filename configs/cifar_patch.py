"""BadNets: a 3x3 white patch at the bottom-right corner, target class 0, poison rate 0.1.

Full run (PreActResNet-18 on TFDS CIFAR-10, BackdoorBench's recipe; a GPU job):
  python -m linfjax.main --config=configs/cifar_patch.py --workdir=runs/patch
Quick run (small CNN on ../shared/data/cifar10-subset, minutes on 2 CPU cores):
  python -m linfjax.main --config=configs/cifar_patch.py:quick --workdir=runs/patch_quick
"""

from linfjax import config as config_lib


def get_config(variant: str = ""):
  config = config_lib.base_config()
  config.trigger.update(config_lib.TRIGGER_PRESETS["patch"])
  return config_lib.apply_variant(config, variant)
