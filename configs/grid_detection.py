"""Neural Cleanse as a detector: 12 backdoored and 12 vanilla quick CIFAR models (seeds 0-11),
trained and reverse-engineered only (stages train and reverse).

  python -m linfjax.main --config=configs/grid_detection.py --workdir=runs/grid_detection
Then the detection rates per statistic, thresholds chosen on seeds 0-5 and reported on
seeds 6-11 and on GTSRB (configs/grid_gtsrb.py) untouched:
  python -m linfjax.reports.detection_rates \\
      --calibration runs/grid_detection/runs/seed={0,1,2,3,4,5} \\
      --held_out cifar runs/grid_detection/runs/seed={6,7,8,9,10,11} \\
      --held_out gtsrb runs/grid_gtsrb/runs/seed=*
"""

from linfjax import config as config_lib


def get_config(variant: str = "quick"):
  config = config_lib.apply_variant(config_lib.base_config(), variant)
  config.trigger.update(config_lib.TRIGGER_PRESETS["patch"])
  config.stages = ("train", "reverse")
  config.sweep.axes = "seed=" + ",".join(str(seed) for seed in range(12))
  return config
