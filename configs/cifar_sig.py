"""SIG (Barni et al., 2019): a horizontal sinusoid, delta 40/255 and f 6 (BackdoorBench's
defaults), clean-label as published: only target-class (0) images are poisoned, labels kept.

The poison rate stays a share of all training images (BackdoorBench's convention), drawn
from the target class only. Ours: 0.09 on full CIFAR-10, since BackdoorBench's 0.1 takes
the whole class and holding out S leaves ~4,950 class-0 images of 49,500; 0.08 (80 % of
the class, as ANP's clean-label setting) on the quick subset, whose class 0 has 456-472
of 4,585 training images for seeds 0-4.

Full run (PreActResNet-18 on TFDS CIFAR-10, BackdoorBench's recipe; a GPU job):
  python -m linfjax.main --config=configs/cifar_sig.py --workdir=runs/sig
Quick run (small CNN on ../shared/data/cifar10-subset, minutes on 2 CPU cores):
  python -m linfjax.main --config=configs/cifar_sig.py:quick --workdir=runs/sig_quick
"""

from linfjax import config as config_lib

POISON_RATES = {"": 0.09, "quick": 0.08}


def get_config(variant: str = ""):
  config = config_lib.base_config()
  config.trigger.update(config_lib.TRIGGER_PRESETS["sig"])
  config = config_lib.apply_variant(config, variant)
  config.poison.rate = POISON_RATES[variant]
  return config
