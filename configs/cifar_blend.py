"""Blend: seeded uniform noise mixed in with alpha 0.2, target class 0, poison rate 0.1.

Full run (PreActResNet-18 on TFDS CIFAR-10, BackdoorBench's recipe; a GPU job):
  python -m linfjax.main --config=configs/cifar_blend.py --workdir=runs/blend
Quick run (small CNN on ../shared/data/cifar10-subset, minutes on 2 CPU cores):
  python -m linfjax.main --config=configs/cifar_blend.py:quick --workdir=runs/blend_quick
"""

from linfjax import config as config_lib


def get_config(variant: str = ""):
  config = config_lib.base_config()
  config.trigger.update(config_lib.TRIGGER_PRESETS["blend"])
  return config_lib.apply_variant(config, variant)
