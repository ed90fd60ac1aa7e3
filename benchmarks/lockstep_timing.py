"""Lockstep (vmapped over models) against sequential training steps, for the benchmarks.

`lockstep_against_sequential` times `replicas` fresh models of one architecture on
synthetic CIFAR-shaped data: one after another with `train.compiled_step` (dense
convolutions), and together with `lockstep.compiled_step` (the step vmapped over a runs
axis on one device: grouped convolutions). Compile time is excluded (each runs one step
first). Used by benchmarks/grid.py and benchmarks/gpu.py.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from linfjax import config as config_lib
from linfjax.runs import lockstep
from linfjax import models
from linfjax import attacks
from linfjax.attacks import poison
from linfjax.training import train


def _states_and_inputs(name: str, batch: int, replicas: int, width: float, dtype: str):
  """`replicas` fresh train states of `name` and their inputs, on synthetic data."""
  model = models.create(name, num_classes=10, width=width, dtype=jnp.dtype(dtype))
  tx = train.make_optimizer(config_lib.base_config().train, 1000)
  rng = np.random.default_rng(0)
  count = batch + 7 * replicas
  images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, count).astype(np.int32)
  trigger = attacks.patch((32, 32, 3), size=3, row=29, col=29, pattern=np.ones(3, np.float32))
  training_set = poison.poison(images, labels, trigger, rate=0.1, target=0, mode="all_to_one",
                               stamp="after_augmentation", num_classes=10, seed=0)
  data = train.to_device(training_set)
  states = [train.create_state(model, models.init(model, jax.random.key(i), (32, 32, 3)), tx)
            for i in range(replicas)]
  keys = [jax.random.key(100 + i) for i in range(replicas)]
  batches = np.stack([np.arange(batch) + 7 * i for i in range(replicas)])
  return states, data, trigger, keys, batches


def lockstep_against_sequential(name: str, batch: int, *, replicas: int, steps: int,
                                width: float = 1.0, dtype: str = "float32"):
  """(sequential, lockstep) seconds per step of all `replicas` models; prints both."""
  states, data, trigger, keys, batches = _states_and_inputs(name, batch, replicas, width, dtype)
  step = train.compiled_step(4, True)

  def sequential_steps(count):
    nonlocal states
    for _ in range(count):
      states = [step(state, data, batch_rows, trigger, key)[0]
                for state, batch_rows, key in zip(states, batches, keys)]
    jax.block_until_ready(states)

  mesh = lockstep.make_mesh(jax.local_devices()[:1])
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(lockstep.RUNS_AXIS))
  stack = lambda trees: jax.device_put(jax.tree.map(lambda *l: jnp.stack(l), *trees), sharding)
  stacked = stack(states)
  stacked_data = stack([data] * len(states))
  stacked_trigger = stack([trigger] * len(states))
  stacked_keys = stack(keys)
  stacked_batches = jax.device_put(batches, sharding)
  vmapped = lockstep.compiled_step(4, True)

  def lockstep_steps(count):
    nonlocal stacked
    for _ in range(count):
      stacked = vmapped(stacked, stacked_data, stacked_batches, stacked_trigger, stacked_keys)[0]
    jax.block_until_ready(stacked)

  timings = {}
  for label, run_steps in (("sequential", sequential_steps), ("lockstep", lockstep_steps)):
    run_steps(1)  # Compiles.
    started = time.perf_counter()
    run_steps(steps)
    timings[label] = (time.perf_counter() - started) / steps
    print(f"{name} x{replicas} {dtype}, batch {batch}, {label}: {timings[label]:.3f} s per "
          "step of every model", flush=True)
  return timings["sequential"], timings["lockstep"]
