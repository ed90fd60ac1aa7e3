"""The paper's setting: GTSRB (43 traffic-sign classes) with an AlexNet-style network.

BadNets' 3x3 white patch at the bottom-right, target 0, poison rate 0.1, and
BackdoorBench's GTSRB recipe (SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine
decay, batch 128, 50 epochs); images resized to 32x32 (bilinear, as torchvision's
Resize) and no horizontal flip (a flip turns one sign into another; BackdoorBench flips
only CIFAR-10). GTSRB comes from the image-folder source: <path>/train/<class>/*.ppm as
GTSRB's Final_Training/Images ships (its CSV files are skipped), and <path>/test/<class>/
for the test images, which GTSRB ships in one folder with a label CSV: sort them into
class folders named as the training ones (00000 ... 00042) first. Nothing is downloaded.

  python -m linfjax.main --config=configs/gtsrb_alexnet.py --workdir=runs/gtsrb \\
      --config.data.path=/data/gtsrb
"""

from linfjax import config as config_lib


def get_config(variant: str = ""):
  if variant:
    raise config_lib.ConfigError(f"unknown config variant {variant!r}; configs/gtsrb_alexnet.py "
                                 "has only the full setting (no GTSRB subset ships with linfjax)")
  config = config_lib.base_config()
  config.data.source = "image_folder"
  config.data.image_size = (32, 32)
  config.model.name = "alexnet"
  config.trigger.update(config_lib.TRIGGER_PRESETS["patch"])
  config.train.epochs = 50
  config.train.flip = False
  return config
