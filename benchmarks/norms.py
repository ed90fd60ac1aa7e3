"""Activation norms: all three in one pass against one pass per norm, and flat memory.

Measures, in one run, on JAX's default backend, with the quick config's small CNN
(randomly initialised; the cost does not depend on the weights) probed at all six
conv layers, on random uint8 images, clean and under a 3x3 patch trigger:
  1. seconds of `norms.norm_statistics` computing l1, l2 and linf in one forward pass
     per batch, against three calls that compute one norm each (three forward passes);
     compile time excluded (each compiled function runs once first), best of `--repeats`;
  2. the memory of the statistics over 1,000 and 5,000 images, each in a fresh
     subprocess: the growth of the process's peak RSS (`resource.getrusage`'s
     ru_maxrss after the call, minus the resident set from /proc/self/statm just before
     it; the images are allocated before, so they are not counted; compile included),
     and the peak of host allocations during the call (`tracemalloc`: NumPy arrays and
     Python objects, not XLA's buffers).
The output ends with one line per ratio, `ratio NAME VALUE target TARGET`.

Run:
  python benchmarks/norms.py [--timing_images=1000 --repeats=3]

About two minutes on 2 CPU cores; the figures depend on the machine and its load.
"""

import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc

from absl import app, flags
import jax
import numpy as np

from linfjax import models
from linfjax.detection import norms
from linfjax import attacks

_TIMING_IMAGES = flags.DEFINE_integer("timing_images", 1000, "images in the timing runs",
                                      lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed repeats (the best counts)", lower_bound=1)
_MEMORY_CHILD = flags.DEFINE_integer(
    "memory_child", 0, "internal: measure the statistics' memory over this many images and "
    "print it as JSON")

BATCH = 250
IMAGE_SHAPE = (32, 32, 3)
MEMORY_IMAGES = (1000, 5000)


def _setup(num_images: int):
  """The quick CNN probed at every layer, its variables, random images and a patch."""
  model = models.create("cnn", num_classes=10)
  model = models.create("cnn", num_classes=10, probe_layers=models.layer_names(model))
  variables = models.init(model, jax.random.key(0), IMAGE_SHAPE)
  images = np.random.default_rng(0).integers(0, 256, (num_images, *IMAGE_SHAPE), np.uint8)
  trigger = attacks.patch(IMAGE_SHAPE, size=3, row=29, col=29, pattern=np.ones(3))
  return model, variables, images, trigger


def _time(fn, repeats: int) -> float:
  fn()  # Compiles.
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def _one_vs_three_passes() -> dict:
  model, variables, images, trigger = _setup(_TIMING_IMAGES.value)
  stats = lambda which: norms.norm_statistics(model.apply, variables, images, [trigger],
                                              batch_size=BATCH, norms=which)
  one = _time(lambda: stats(norms.NORMS), _REPEATS.value)
  three = _time(lambda: [stats((norm,)) for norm in norms.NORMS], _REPEATS.value)
  together, apart = stats(norms.NORMS), {norm: stats((norm,)) for norm in norms.NORMS}
  gap = max(float(np.max(np.abs(together[layer].mean[:, i] - apart[norm][layer].mean[:, 0])))
            for layer in together for i, norm in enumerate(norms.NORMS))
  return {"one": one, "three": three, "gap": gap, "layers": list(together)}


def _resident_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_child(num_images: int) -> None:
  model, variables, images, trigger = _setup(num_images)
  before = _resident_bytes()
  tracemalloc.start()
  norms.norm_statistics(model.apply, variables, images, [trigger], batch_size=BATCH)
  _, host_peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB.
  print(json.dumps({"images": num_images, "rss_growth": peak - before, "peak_rss": peak,
                    "host_peak": host_peak}))


def _memory(num_images: int) -> dict:
  result = subprocess.run([sys.executable, os.path.abspath(__file__),
                           f"--memory_child={num_images}"], check=True, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _MEMORY_CHILD.value:
    _memory_child(_MEMORY_CHILD.value)
    return
  print(f"jax {jax.__version__}: backend {jax.default_backend()}, device "
        f"{jax.devices()[0].device_kind}; {len(os.sched_getaffinity(0))} cores")
  timing = _one_vs_three_passes()
  memory = {n: _memory(n) for n in MEMORY_IMAGES}
  images = 2 * _TIMING_IMAGES.value
  print(f"\ncnn (quick, width 1) probed at {', '.join(timing['layers'])}; batch {BATCH} "
        f"clean + {BATCH} triggered images per pass")
  print("| what | seconds | images/s |")
  print("| --- | --- | --- |")
  print(f"| l1, l2, linf in one pass, {images} images | {timing['one']:.2f} | "
        f"{images / timing['one']:.0f} |")
  print(f"| one pass per norm (three passes) | {timing['three']:.2f} | "
        f"{images / timing['three']:.0f} |")
  print(f"max |mean| gap one pass vs three: {timing['gap']:.2g}")
  print("\n| images | peak RSS growth during the statistics (MiB) | process peak RSS (MiB) | "
        "tracemalloc peak (KiB) |")
  print("| --- | --- | --- | --- |")
  for n, m in memory.items():
    print(f"| {n} | {m['rss_growth'] / 2**20:.1f} | {m['peak_rss'] / 2**20:.1f} | "
          f"{m['host_peak'] / 2**10:.1f} |")
  small, large = memory[MEMORY_IMAGES[0]], memory[MEMORY_IMAGES[1]]
  print(f"ratio norms_one_pass_vs_three {timing['three'] / timing['one']:.2f} target 2.5")
  print(f"ratio norms_memory_5000_vs_1000 {large['rss_growth'] / small['rss_growth']:.2f} "
        "target 1.1")
  print(f"ratio norms_host_memory_5000_vs_1000 {large['host_peak'] / small['host_peak']:.2f} "
        "target 1.1")


if __name__ == "__main__":
  app.run(main)
