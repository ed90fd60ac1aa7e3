"""Grids: runs in one process against one process per run; lockstep against sequential.

Measures, in one invocation, on JAX's default backend:
  1. the wall time of a grid of `--runs` quick-shape runs (seeds 0..runs-1 of
     configs/cifar_patch.py:quick: its model, batch and image shapes, every stage, on a
     slice with a short schedule: the first `--train_limit` training and `--test_limit`
     test images, `--epochs` of training, 2 Neural Cleanse steps, 1 fine-tuning epoch),
     the many-small-runs regime where per-process start-up matters, as one
     `python -m linfjax.main` grid, against the same runs as separate
     `python -m linfjax.main` processes one after another. Both sides import, load the
     data and compile; the grid does so once. Every run's results.json is checked to be
     identical on both sides;
  2. seconds per training step of `--replicas` models trained one after another
     (`train.compiled_step`, dense convolutions) against the same models in lockstep
     (`lockstep.compiled_step`, vmapped over the runs axis: grouped convolutions), for
     `cnn` (batch 128) and `preact_resnet18` (batch `--resnet_batch`). A ratio above 1
     means lockstep is faster; `config.sweep.models_per_device` defaults to 1 because it
     is below 1 here.
The output ends with one line per ratio, `ratio NAME VALUE target TARGET`.

Run (from the repo root, with ../shared beside it):
  python benchmarks/grid.py [--runs=8 --epochs=1 --replicas=4 --steps=3]
On 2 CPU cores it takes about 15 minutes; the numbers depend on the machine and its load.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from linfjax import config as config_lib
from linfjax import lockstep, models, poison, train, triggers

_RUNS = flags.DEFINE_integer("runs", 8, "runs in the grid (seeds 0..runs-1)", lower_bound=2)
_EPOCHS = flags.DEFINE_integer("epochs", 1, "training epochs of each run", lower_bound=1)
_TRAIN_LIMIT = flags.DEFINE_integer("train_limit", 1500, "training images of each run (500 of "
                                    "them are the clean set S); 0: all 5,085", lower_bound=0)
_TEST_LIMIT = flags.DEFINE_integer("test_limit", 500, "test images; 0: all 1,017", lower_bound=0)
_REPLICAS = flags.DEFINE_integer("replicas", 4, "models per lockstep step", lower_bound=2)
_STEPS = flags.DEFINE_integer("steps", 3, "timed training steps per side", lower_bound=1)
_RESNET_BATCH = flags.DEFINE_integer("resnet_batch", 32, "PreActResNet-18 batch size",
                                     lower_bound=1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def short_schedule() -> list[str]:
  return [f"--config.train.epochs={_EPOCHS.value}", "--config.reverse.steps=2",
          f"--config.data.train_limit={_TRAIN_LIMIT.value}",
          f"--config.data.test_limit={_TEST_LIMIT.value}",
          "--config.reverse.checkpoint_every=2", "--config.prune.fine_tune_epochs=1", "--quiet"]


def timed(command: list[str]) -> float:
  started = time.perf_counter()
  subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  return time.perf_counter() - started


def grid_against_processes(workdir: str) -> tuple[float, float]:
  runs = _RUNS.value
  seeds = ",".join(str(seed) for seed in range(runs))
  grid_seconds = timed([sys.executable, "-m", "linfjax.main",
                        "--config=configs/cifar_patch.py:quick", f"--config.sweep.axes=seed={seeds}",
                        f"--workdir={workdir}/grid"] + short_schedule())
  print(f"grid of {runs} runs in one process: {grid_seconds:.1f} s", flush=True)
  process_seconds = 0.0
  for seed in range(runs):
    process_seconds += timed([sys.executable, "-m", "linfjax.main",
                              "--config=configs/cifar_patch.py:quick", f"--config.seed={seed}",
                              f"--workdir={workdir}/process_{seed}"] + short_schedule())
    print(f"  process {seed + 1}/{runs}: {process_seconds:.1f} s so far", flush=True)
  print(f"{runs} separate processes: {process_seconds:.1f} s", flush=True)
  for seed in range(runs):
    with open(os.path.join(workdir, "grid", "runs", f"seed={seed}", "results.json")) as f:
      in_grid = json.load(f)
    with open(os.path.join(workdir, f"process_{seed}", "results.json")) as f:
      alone = json.load(f)
    if in_grid != alone:
      raise AssertionError(f"seed {seed}: the grid's results differ from the separate run's")
  print("every run's results.json is identical in the grid and alone")
  return grid_seconds, process_seconds


def _states_and_inputs(name: str, batch: int):
  """`--replicas` fresh train states of `name` and their inputs, on synthetic data."""
  model = models.create(name, num_classes=10)
  tx = train.make_optimizer(config_lib.base_config().train, 1000)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (1024, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 1024).astype(np.int32)
  trigger = triggers.patch((32, 32, 3), size=3, row=29, col=29, pattern=np.ones(3, np.float32))
  training_set = poison.poison(images, labels, trigger, rate=0.1, target=0, mode="all_to_one",
                               stamp="after_augmentation", num_classes=10, seed=0)
  data = train.to_device(training_set)
  states = [train.create_state(model, models.init(model, jax.random.key(i), (32, 32, 3)), tx)
            for i in range(_REPLICAS.value)]
  keys = [jax.random.key(100 + i) for i in range(_REPLICAS.value)]
  batches = np.stack([np.arange(batch) + 7 * i for i in range(_REPLICAS.value)])
  return states, data, trigger, keys, batches


def lockstep_against_sequential(name: str, batch: int) -> tuple[float, float]:
  states, data, trigger, keys, batches = _states_and_inputs(name, batch)
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
    run_steps(_STEPS.value)
    timings[label] = (time.perf_counter() - started) / _STEPS.value
    print(f"{name} x{_REPLICAS.value}, batch {batch}, {label}: {timings[label]:.3f} s per step "
          "of every model", flush=True)
  return timings["sequential"], timings["lockstep"]


def main(argv):
  del argv
  print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
  workdir = tempfile.mkdtemp(prefix="linfjax_grid_bench_")
  try:
    grid_seconds, process_seconds = grid_against_processes(workdir)
  finally:
    shutil.rmtree(workdir)
  cnn = lockstep_against_sequential("cnn", 128)
  resnet = lockstep_against_sequential("preact_resnet18", _RESNET_BATCH.value)
  print(f"ratio grid_one_process_vs_processes {process_seconds / grid_seconds:.2f} target 3")
  print(f"ratio lockstep_vs_sequential_cnn {cnn[0] / cnn[1]:.2f} target 1")
  print(f"ratio lockstep_vs_sequential_preact_resnet18 {resnet[0] / resnet[1]:.2f} target 1")


if __name__ == "__main__":
  app.run(main)
