"""How close a training step is to the machine's limit: FLOPs per step over a measured peak.

Measures, in one run, on JAX's default backend:
  1. the peak: FLOP/s of the best of `--repeats` large square matmuls (`--matmul_size`,
     float32 on CPU, bfloat16 on a GPU, the dtype the step's convolutions run in there),
     2 n^3 FLOPs each;
  2. for each model: the FLOPs of one training step (`train.train_step`: crop, flip, trigger
     stamping, forward, backward, SGD update) from XLA's own cost analysis of the compiled
     step (`jit(...).lower(...).compile().cost_analysis()`), and its seconds (best of
     `--steps` after one that compiles);
  3. the model FLOP utilisation MFU = (FLOPs per step / seconds per step) / peak.
Models: the quick config's small `cnn` (batch 128, fp32), and `preact_resnet18` (batch 128,
fp32), plus on a GPU both in bf16 at batch 512 (`train.compute_dtype`).
The output ends with `ratio mfu_<model>_<dtype>_b<batch> VALUE target 0.45` lines (the
issue's aim for bf16 on a GPU; no aim is set for CPU, where the line is for reading).

Run:
  python benchmarks/mfu.py [--steps=3 --matmul_size=2048] [--tiny]
About two minutes on 2 idle CPU cores; `--tiny` (CI) shrinks models and sizes.
"""

import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from linfjax import config as config_lib
from linfjax import models
from linfjax import attacks
from linfjax.attacks import poison
from linfjax.training import train

_STEPS = flags.DEFINE_integer("steps", 3, "timed steps per model (the best counts)",
                              lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed matmuls (the best counts)", lower_bound=1)
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 0, "matmul side; 0: 2048 on CPU, 8192 on "
                                    "a GPU", lower_bound=0)
_TINY = flags.DEFINE_bool("tiny", False, "tiny sizes (CI), not for figures")

IMAGE_SHAPE = (32, 32, 3)


def flops_of(compiled) -> float:
  """FLOPs from XLA's cost analysis of a compiled function (a dict, or a list of one)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"])


def best_seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # Compiles.
  best = float("inf")
  for _ in range(repeats):
    started = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - started)
  return best


def matmul_peak(size: int, dtype, repeats: int) -> float:
  """FLOP/s of the best of `repeats` [size, size] @ [size, size] products."""
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.random.normal(k, (size, size), dtype) for k in keys)
  product = jax.jit(jnp.matmul)
  return 2 * size ** 3 / best_seconds(lambda: product(a, b), repeats)


def step_mfu(name: str, batch: int, dtype: str, peak: float, *, width: float, steps: int):
  """(FLOPs per step, seconds per step, MFU) of `name`'s training step."""
  model = models.create(name, num_classes=10, width=width, dtype=jnp.dtype(dtype))
  recipe = config_lib.base_config().train
  state = train.create_state(model, models.init(model, jax.random.key(0), IMAGE_SHAPE),
                             train.make_optimizer(recipe, 1000))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, *IMAGE_SHAPE), dtype=np.uint8)
  trigger = attacks.patch(IMAGE_SHAPE, size=3, row=29, col=29, pattern=np.ones(3, np.float32))
  data = train.to_device(poison.poison(images, rng.integers(0, 10, batch), trigger, rate=0.1,
                                       target=0, mode="all_to_one", stamp="after_augmentation",
                                       num_classes=10, seed=0))
  indices = np.arange(batch)
  key = jax.random.key(1)
  step = train.compiled_step(4, True)
  flops = flops_of(step.lower(state, data, indices, trigger, key).compile())
  holder = [state]

  def one_step():
    holder[0], metrics = step(holder[0], data, indices, trigger, key)
    return metrics["loss"]

  seconds = best_seconds(one_step, steps)
  return flops, seconds, flops / seconds / peak


def main(argv):
  del argv
  gpu = jax.default_backend() == "gpu"
  device = jax.devices()[0].device_kind
  peak_dtype = jnp.bfloat16 if gpu else jnp.float32
  size = _MATMUL_SIZE.value or (256 if _TINY.value else 8192 if gpu else 2048)
  peak = matmul_peak(size, peak_dtype, _REPEATS.value)
  print(f"jax {jax.__version__}: backend {jax.default_backend()}, device {device}")
  print(f"peak: {peak / 1e9:.1f} GFLOP/s ({jnp.dtype(peak_dtype).name} matmul {size}x{size}, "
        f"best of {_REPEATS.value})")
  width = 0.125 if _TINY.value else 1.0
  batch = 16 if _TINY.value else 128
  cases = [("cnn", batch, "float32"), ("preact_resnet18", batch, "float32")]
  if gpu:
    cases += [("cnn", 512, "bfloat16"), ("preact_resnet18", 512, "bfloat16")]
  print("\n| model | dtype | batch | GFLOP per step (XLA) | s per step | GFLOP/s | MFU |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  rows = []
  for name, case_batch, dtype in cases:
    flops, seconds, mfu = step_mfu(name, case_batch, dtype, peak, width=width,
                                   steps=_STEPS.value)
    rows.append((name, dtype, case_batch, mfu))
    print(f"| {name} | {dtype} | {case_batch} | {flops / 1e9:.2f} | {seconds:.3f} | "
          f"{flops / seconds / 1e9:.1f} | {100 * mfu:.1f} % |", flush=True)
  for name, dtype, case_batch, mfu in rows:
    print(f"ratio mfu_{name}_{dtype}_b{case_batch} {mfu:.3f} target 0.45")


if __name__ == "__main__":
  app.run(main)
