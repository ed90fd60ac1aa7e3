"""Neural Cleanse over all classes: one vmapped solve against a loop over the classes.

Times `linfjax.detection.neural_cleanse.solve` (every class's mask and pattern in one jitted, vmapped
update; the model's weights and the batch shared) against `solve_per_class` (the same
math, seeds and batches, one class at a time), for the quick config's small CNN, randomly
initialised, on random 32x32x3 images. Early stopping is off, so both run every step.
Compile time is excluded (both jitted functions are warmed first). The output ends with
`ratio reverse_vmapped_vs_loop VALUE target 2`, VALUE = loop seconds / vmapped seconds.

Run:
  python benchmarks/reverse.py [--steps=3 --mini_batches=4 --batch_size=32]

About a minute on 2 idle CPU cores; the figures depend on the machine and its load.
"""

import dataclasses
import os
import time

from absl import app, flags
import jax
import numpy as np

from linfjax import config as config_lib
from linfjax import models
from linfjax.detection import neural_cleanse as reverse

_STEPS = flags.DEFINE_integer("steps", 3, "Neural Cleanse steps per variant", lower_bound=1)
_MINI_BATCHES = flags.DEFINE_integer("mini_batches", 4, "Adam updates per step", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 32, "images per update (NC's default)",
                              lower_bound=1)

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
NUM_IMAGES = 500  # The size of the defender's clean set S.


def _warm(apply_fn, variables, images, settings: reverse.Settings, vmapped: bool) -> float:
  """Compiles one variant's update and end-of-step functions; returns the seconds it took."""
  update_fn, end_fn = reverse.compiled(apply_fn, settings, vmapped)
  state = reverse.init(jax.random.key(0), IMAGE_SHAPE, NUM_CLASSES, settings)
  targets = np.arange(NUM_CLASSES, dtype=np.int32)
  if not vmapped:
    state = jax.tree.map(lambda leaf: leaf[0], state)
    targets = targets[0]
  checked = reverse.check_images(images, jax.random.key(0), settings)
  start = time.perf_counter()
  state = update_fn(state, variables, images, np.arange(settings.batch_size, dtype=np.int32),
                    targets)
  jax.block_until_ready(end_fn(state, variables, checked, targets))
  return time.perf_counter() - start


def main(argv):
  del argv
  print(f"jax {jax.__version__}: backend {jax.default_backend()}, device "
        f"{jax.devices()[0].device_kind}; {len(os.sched_getaffinity(0))} cores")
  quick = config_lib.make_quick(config_lib.base_config())
  settings = reverse.Settings.from_config(quick.reverse)
  settings = dataclasses.replace(settings, steps=_STEPS.value, mini_batches=_MINI_BATCHES.value,
                                 batch_size=_BATCH.value, early_stop_patience=_STEPS.value + 1)
  model = models.create(quick.model.name, num_classes=NUM_CLASSES, width=quick.model.width)
  variables = jax.jit(lambda key: models.init(model, key, IMAGE_SHAPE))(jax.random.key(0))
  images = jax.device_put(np.random.default_rng(0).integers(
      0, 256, (NUM_IMAGES, *IMAGE_SHAPE), dtype=np.uint8))

  compile_seconds = {vmapped: _warm(model.apply, variables, images, settings, vmapped)
                     for vmapped in (True, False)}
  kwargs = dict(num_classes=NUM_CLASSES, key=jax.random.key(1), settings=settings)
  start = time.perf_counter()
  together = jax.block_until_ready(reverse.solve(model.apply, variables, images, **kwargs))
  vmapped_seconds = time.perf_counter() - start
  start = time.perf_counter()
  one_by_one = jax.block_until_ready(
      reverse.solve_per_class(model.apply, variables, images, **kwargs))
  loop_seconds = time.perf_counter() - start
  gap = np.max(np.abs(reverse.result(together).mask_l1 - reverse.result(one_by_one).mask_l1))

  updates = settings.steps * settings.mini_batches
  rate = lambda seconds: NUM_CLASSES * updates * settings.batch_size / seconds
  print(f"\n| what ({quick.model.name}, {NUM_CLASSES} classes, {updates} updates of batch "
        f"{settings.batch_size}, fp32) | seconds | images/s |")
  print("| --- | --- | --- |")
  print(f"| one vmapped solve over all classes | {vmapped_seconds:.1f} "
        f"| {rate(vmapped_seconds):.0f} |")
  print(f"| a loop over the classes | {loop_seconds:.1f} | {rate(loop_seconds):.0f} |")
  print(f"\nfirst call (compile + one update): vmapped {compile_seconds[True]:.1f} s, "
        f"per class {compile_seconds[False]:.1f} s; max |mask l1 gap| {gap:.2g}")
  print(f"ratio reverse_vmapped_vs_loop {loop_seconds / vmapped_seconds:.2f} target 2")


if __name__ == "__main__":
  app.run(main)
