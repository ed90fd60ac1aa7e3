"""WaNet (Nguyen and Tran, 2021): a smooth warp from a seeded 4x4 control grid, strength
0.5, target 0, poison rate 0.1, and its noise mode (cross_ratio 2: twice as many examples
warped with fresh noise, labels kept), WaNet's published defaults.

Training keeps linfjax's recipe (crop and flip, the warp applied after augmentation);
WaNet's own code also rotates by up to 10 degrees and warps before augmenting.

Full run (PreActResNet-18 on TFDS CIFAR-10, BackdoorBench's recipe; a GPU job):
  python -m linfjax.main --config=configs/cifar_wanet.py --workdir=runs/wanet
Quick run (small CNN on ../shared/data/cifar10-subset, minutes on 2 CPU cores):
  python -m linfjax.main --config=configs/cifar_wanet.py:quick --workdir=runs/wanet_quick
"""

from linfjax import config as config_lib


def get_config(variant: str = ""):
  config = config_lib.base_config()
  config.trigger.update(config_lib.TRIGGER_PRESETS["wanet"])
  return config_lib.apply_variant(config, variant)
