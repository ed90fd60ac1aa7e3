"""Pruning sweep: 32 levels in one call (prefix once, vmapped head) against 32 full passes.

Measures, in one run, on JAX's default backend, with the quick config's small CNN
(randomly initialised; the cost does not depend on the weights) pruned at its default
layer (conv3_2, K=128), on the same random uint8 images, clean and under a 3x3 patch:
  1. `prune.sweep`'s jitted call: the layers up to conv3_2 once per batch, then the head
     for all 32 masks, vmapped in chunks of `--mask_batch` (`jax.lax.map`);
  2. the same call with all 32 masks vmapped at once (`--mask_batch` = 32), for reference;
  3. 32 calls of one jitted full forward pass, one per mask (`masks={layer: mask}`).
Compile time is excluded (each compiled function runs once first); the sweeps are the
best of `--repeats`, the 32 passes (about 30x slower) the best of `--pass_repeats`. The
predicted classes of 1 and 3 are compared; the output ends with
`ratio prune_sweep_vs_passes VALUE target 10` (seconds of 3 over seconds of 1).

Run:
  python benchmarks/prune.py [--images=500 --repeats=3 --pass_repeats=1 --mask_batch=8]

25 to 50 seconds on 2 CPU cores, depending on other load; the figures depend on the
machine and its load.
"""

import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from linfjax import models
from linfjax.defenses import pruning as prune
from linfjax import attacks

_IMAGES = flags.DEFINE_integer("images", 500, "images per level, each evaluated clean and "
                               "triggered", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed repeats of the sweeps (the best counts)",
                                lower_bound=1)
_PASS_REPEATS = flags.DEFINE_integer("pass_repeats", 1, "timed repeats of the 32 passes",
                                     lower_bound=1)
_MASK_BATCH = flags.DEFINE_integer("mask_batch", 8, "masks vmapped together in the sweep",
                                   lower_bound=1)

LEVELS = 32
BATCH = 500
IMAGE_SHAPE = (32, 32, 3)


def _time(fn, repeats: int):
  """Best seconds of `repeats` calls of `fn` (compiled already), and its last output."""
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    output = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best, output


def main(argv):
  del argv
  model = models.create("cnn", num_classes=10)
  variables = models.init(model, jax.random.key(0), IMAGE_SHAPE)
  layer = model.default_probe
  images = np.random.default_rng(0).integers(0, 256, (_IMAGES.value, *IMAGE_SHAPE), np.uint8)
  trigger = attacks.patch(IMAGE_SHAPE, size=3, row=29, col=29, pattern=np.ones(3))
  order = np.random.default_rng(1).permutation(128)
  stack = jnp.asarray(prune.masks(order, np.arange(LEVELS) * 4))
  batches = [images[i:i + BATCH] for i in range(0, len(images), BATCH)]

  def sweep(mask_batch):
    predict = prune.compiled_predictions(model.apply, layer, mask_batch)
    run = lambda: [predict(variables, batch, (trigger,), {layer: stack}) for batch in batches]
    jax.block_until_ready(run())  # Compiles.
    return run

  full = jax.jit(lambda v, x, m: jnp.argmax(
      model.apply(v, jnp.concatenate([x, attacks.apply(trigger, x)]), {layer: m})[0], -1))

  def passes():
    out = []
    for batch in batches:
      x = jnp.asarray(batch, jnp.float32) / 255.0
      out.append([full(variables, x, m) for m in stack])
    return out

  chunked, swept = _time(sweep(_MASK_BATCH.value), _REPEATS.value)
  at_once, _ = _time(sweep(LEVELS), _REPEATS.value)
  for batch in {len(b): b for b in batches}.values():  # Compiles each batch shape once.
    jax.block_until_ready(full(variables, jnp.asarray(batch, jnp.float32) / 255.0, stack[0]))
  separate, reference = _time(passes, _PASS_REPEATS.value)

  swept = np.concatenate([np.asarray(p).reshape(LEVELS, -1) for p in swept], axis=1)
  reference = np.concatenate([np.stack([np.asarray(p) for p in per_batch])
                              for per_batch in reference], axis=1)
  agreement = float(np.mean(swept == reference))
  print(f"backend {jax.default_backend()}, {_IMAGES.value} images clean + triggered, "
        f"{LEVELS} masks of {layer} (K=128)")
  print(f"  one call, prefix once, masks vmapped in chunks of {_MASK_BATCH.value}: "
        f"{chunked:.3f} s")
  print(f"  one call, prefix once, all {LEVELS} masks vmapped at once: {at_once:.3f} s")
  print(f"  {LEVELS} full forward passes, one per mask: {separate:.3f} s")
  print(f"  predictions agree on {100 * agreement:.2f} % of (mask, image) pairs")
  print(f"ratio prune_sweep_vs_passes {separate / chunked:.2f} target 10")


if __name__ == "__main__":
  app.run(main)
