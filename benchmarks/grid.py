"""Grids: runs in one process against one process per run; lockstep against sequential.

Measures, in one invocation, on JAX's default backend:
  1. the wall time of a grid of quick-shape runs (`--axes`, by default the issue's shape
     `trigger=patch,blend poison.rate=0.05,0.1 seed=0,1`: 8 runs, 2 distinct vanilla
     models; configs/cifar_patch.py:quick's model, batch and image shapes, every stage, on
     a slice with a short schedule: the first `--train_limit` training and `--test_limit`
     test images, `--epochs` of training, 2 Neural Cleanse steps, 1 fine-tuning epoch), as
     (a) one `python -m linfjax.main` process per run, one after another (each a one-run
     grid with `sweep.share=False`, so that it does all its own work, as today), (b) one grid process with `sweep.share=False` (compiled once, every run does
     all its own work), and (c) one grid process as configured by default (each distinct
     vanilla model trained and reverse-engineered once). The persistent compilation cache is off on every side
     (benchmarks/stage_profile.py measures it). (a) / (c) is the grid's gain; (a) - (b) is what compiling
     once and starting once save, and (b) - (c) what sharing saves. Every run's
     results.json is checked to be identical on all three sides;
  2. seconds per training step of `--replicas` models trained one after another
     (`train.compiled_step`, dense convolutions) against the same models in lockstep
     (`lockstep.compiled_step`, vmapped over the runs axis: grouped convolutions), for
     `cnn` (batch 128) and `preact_resnet18` (batch `--resnet_batch`). A ratio above 1
     means lockstep is faster; `config.sweep.models_per_device` defaults to 1 because it
     is below 1 here.
The output ends with one line per ratio, `ratio NAME VALUE target TARGET`.

Run (from the repo root, with ../shared beside it):
  python benchmarks/grid.py [--axes="..." --epochs=1 --replicas=4 --steps=3] [--small]
On 2 idle CPU cores the default takes about 20 minutes; `--small` (4 runs sharing one
vanilla model, 1,000 training / 300 test images, 2 replicas, 1 step) 13 to 17 (measured); `--tiny`
(CI) tiny models and data. The numbers depend on the machine and its load.
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

from linfjax import config as config_lib
from linfjax.runs import grid
import lockstep_timing

_AXES = flags.DEFINE_string("axes", "trigger=patch,blend poison.rate=0.05,0.1 seed=0,1",
                            "the grid's axes (config.sweep.axes)")
_SMALL = flags.DEFINE_bool("small", False, "a smaller measurement (run_all.py): 4 runs, "
                           "fewer images, 2 replicas, 1 step")
_TINY = flags.DEFINE_bool("tiny", False, "tiny models and data (CI), not for figures")
_EPOCHS = flags.DEFINE_integer("epochs", 1, "training epochs of each run", lower_bound=1)
_TRAIN_LIMIT = flags.DEFINE_integer("train_limit", 1500, "training images of each run (500 of "
                                    "them are the clean set S); 0: all 5,085", lower_bound=0)
_TEST_LIMIT = flags.DEFINE_integer("test_limit", 500, "test images; 0: all 1,017", lower_bound=0)
_REPLICAS = flags.DEFINE_integer("replicas", 4, "models per lockstep step", lower_bound=2)
_STEPS = flags.DEFINE_integer("steps", 3, "timed training steps per side", lower_bound=1)
_RESNET_BATCH = flags.DEFINE_integer("resnet_batch", 32, "PreActResNet-18 batch size",
                                     lower_bound=1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SMALL = dict(axes="trigger=patch,blend poison.rate=0.05,0.1", train_limit=1000, test_limit=300,
             replicas=2, steps=1)


def setting(name: str):
  """A flag's value, or its --small / --tiny replacement."""
  if (_SMALL.value or _TINY.value) and name in SMALL:
    return SMALL[name]
  return globals()["_" + name.upper()].value


def short_schedule() -> list[str]:
  flags_ = [f"--config.train.epochs={_EPOCHS.value}", "--config.reverse.steps=2",
            f"--config.data.train_limit={setting('train_limit')}",
            f"--config.data.test_limit={setting('test_limit')}",
            "--config.reverse.checkpoint_every=2", "--config.prune.fine_tune.epochs=1",
            "--quiet", "--compile_cache=off"]
  if _TINY.value:
    flags_ += ["--config.data.train_limit=300", "--config.data.test_limit=100",
               "--config.data.clean_set_size=100", "--config.model.width=0.125",
               "--config.train.batch_size=32", "--config.train.eval_batch_size=50",
               "--config.reverse.mini_batches=1", "--config.reverse.batch_size=16"]
  return flags_


def timed(command: list[str]) -> float:
  started = time.perf_counter()
  subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  return time.perf_counter() - started


def _main_command(workdir: str, axes: str, *extra: str) -> list[str]:
  return [sys.executable, "-m", "linfjax.main", "--config=configs/cifar_patch.py:quick",
          f"--config.sweep.axes={axes}", f"--workdir={workdir}", *short_schedule(), *extra]


def _results(workdir: str, name: str) -> dict:
  with open(os.path.join(workdir, "runs", name, "results.json")) as f:
    return json.load(f)


def grid_against_processes(workdir: str) -> dict[str, float]:
  """Seconds of (a) a process per run, (b) one grid process unshared, (c) one shared."""
  axes = setting("axes")
  names = [run.name for run in grid.expand(_axes_config(axes))]
  seconds = {"processes": 0.0}
  for i, name in enumerate(names):
    one_run_grid = " ".join(name.split(","))  # The run's values as one-value axes.
    seconds["processes"] += timed(_main_command(f"{workdir}/processes", one_run_grid,
                                                "--config.sweep.share=False"))
    print(f"  process {i + 1}/{len(names)}: {seconds['processes']:.1f} s so far", flush=True)
  print(f"{len(names)} separate processes: {seconds['processes']:.1f} s", flush=True)
  seconds["unshared"] = timed(_main_command(f"{workdir}/unshared", axes,
                                            "--config.sweep.share=False"))
  print(f"one grid process, sweep.share=False: {seconds['unshared']:.1f} s", flush=True)
  seconds["shared"] = timed(_main_command(f"{workdir}/shared", axes))
  print(f"one grid process, shared work: {seconds['shared']:.1f} s", flush=True)
  for name in names:
    alone = _results(f"{workdir}/processes", name)
    for side in ("unshared", "shared"):
      if _results(f"{workdir}/{side}", name) != alone:
        raise AssertionError(f"{name}: the {side} grid's results differ from the run alone")
  print(f"every run's results.json is identical in both grids and alone ({len(names)} runs)")
  return seconds


def _axes_config(axes: str):
  config = config_lib.make_quick(config_lib.base_config())
  config.sweep.axes = axes
  return config


def lockstep_against_sequential(name: str, batch: int) -> tuple[float, float]:
  return lockstep_timing.lockstep_against_sequential(
      name, batch, replicas=setting("replicas"), steps=setting("steps"),
      width=0.125 if _TINY.value else 1.0)


def main(argv):
  del argv
  print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
  workdir = tempfile.mkdtemp(prefix="linfjax_grid_bench_")
  try:
    seconds = grid_against_processes(workdir)
  finally:
    shutil.rmtree(workdir)
  cnn = lockstep_against_sequential("cnn", 32 if _TINY.value else 128)
  resnet = lockstep_against_sequential("preact_resnet18", 8 if _TINY.value else _RESNET_BATCH.value)
  gain = seconds["processes"] - seconds["shared"]
  once, sharing = seconds["processes"] - seconds["unshared"], seconds["unshared"] - seconds["shared"]
  print(f"saved against separate processes: {gain:.1f} s, of which compiling and starting "
        f"once {once:.1f} s ({100 * once / gain:.0f} %) and sharing work "
        f"{sharing:.1f} s ({100 * sharing / gain:.0f} %)")
  print(f"one grid process unshared vs processes: "
        f"{seconds['processes'] / seconds['unshared']:.2f}x")
  print(f"ratio grid_one_process_vs_processes {seconds['processes'] / seconds['shared']:.2f} "
        "target 3")
  print(f"ratio lockstep_vs_sequential_cnn {cnn[0] / cnn[1]:.2f} target 1")
  print(f"ratio lockstep_vs_sequential_preact_resnet18 {resnet[0] / resnet[1]:.2f} target 1")


if __name__ == "__main__":
  app.run(main)
