"""Runs every benchmark, each in its small mode, and prints one table of their ratios.

Each benchmark script runs in its own process, one after another, in this invocation, so
every ratio in the table was measured on the same machine in the same run. The output
starts with the machine (CPU model, cores, load; the GPU's name if JAX sees one) and the
library versions, and ends with the table and every ratio again as
`ratio NAME VALUE target TARGET` lines. The load average before and after says whether
other work shared the cores: figures taken with a load above half the cores are marked
"under load".

Run (from the repo root, with ../shared beside it):
  python benchmarks/run_all.py            # every CPU benchmark; <= 15 min on 2 idle cores
  python benchmarks/run_all.py --gpu      # the GPU set instead (benchmarks/gpu.py; gpu.sh)
  python benchmarks/run_all.py --only=prune,norms [--tiny]
`--tiny` runs every benchmark at tiny sizes (CI: checks that they run, not for figures).
train_step.py needs PyTorch (`pip install -e '.[bench]'`); without it that benchmark is
reported as skipped.
"""

import importlib.metadata
import importlib.util
import os
import platform
import re
import subprocess
import sys
import time

from absl import app, flags

_ONLY = flags.DEFINE_list("only", [], "run only these benchmarks (names of the table)")
_TINY = flags.DEFINE_bool("tiny", False, "tiny sizes (CI), not for figures")
_GPU = flags.DEFINE_bool("gpu", False, "the GPU set (benchmarks/gpu.py) instead of the CPU set")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RATIO = re.compile(r"^ratio (\S+) (\S+) target (\S+)\s*$")
# name: (script, small-mode flags, tiny-mode flags, needs torch).
CPU_BENCHMARKS = {
    "prune": ("prune.py", ["--images=250", "--repeats=2"], ["--images=20", "--repeats=1"],
              False),
    "norms": ("norms.py", ["--timing_images=500", "--repeats=2"],
              ["--timing_images=50", "--repeats=1"], False),
    "reverse": ("reverse.py", ["--steps=2", "--mini_batches=2"],
                ["--steps=1", "--mini_batches=1", "--batch_size=8"], False),
    "train_step": ("train_step.py", ["--steps=3", "--warmup=1", "--epoch_steps=1"],
                   ["--steps=1", "--warmup=1", "--epoch_steps=1"], True),
    "mfu": ("mfu.py", ["--steps=3"], ["--tiny", "--steps=1", "--repeats=1"], False),
    "compile_cache": ("stage_profile.py", ["--configs=quick_short"],
                      ["--configs=quick_short", "--tiny"], False),
    "grid": ("grid.py", ["--small"], ["--tiny"], False),
}
GPU_BENCHMARKS = {
    "gpu": ("gpu.py", [], ["--tiny"], False),
    "mfu": CPU_BENCHMARKS["mfu"][:2] + (["--tiny", "--steps=1", "--repeats=1"], False),
    "reverse": ("reverse.py", ["--steps=5", "--mini_batches=16"],
                CPU_BENCHMARKS["reverse"][2], False),
    "prune": ("prune.py", ["--images=2000", "--repeats=3"], CPU_BENCHMARKS["prune"][2], False),
}
# Ratios where lower is better (memory growth); every other ratio aims at or above target.
LOWER_IS_BETTER = ("norms_memory_5000_vs_1000", "norms_host_memory_5000_vs_1000")


def versions() -> str:
  names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch")
  found = []
  for name in names:
    try:
      found.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
      found.append(f"{name} absent")
  return f"Python {platform.python_version()}; " + ", ".join(found)


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def gpu_name() -> str:
  """The GPU that JAX sees, asked in a child process so this one stays free of JAX."""
  probe = ("import jax; d = jax.devices()[0]; "
           "print(d.device_kind if d.platform == 'gpu' else 'none')")
  completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
  return completed.stdout.strip().splitlines()[-1] if completed.returncode == 0 else "unknown"


def run_benchmark(script: str, args: list[str]) -> tuple[float, list[tuple], str]:
  """Runs one script; returns its seconds, its ratio lines and the tail of its output."""
  started = time.perf_counter()
  completed = subprocess.run([sys.executable, os.path.join(HERE, script), *args], cwd=REPO,
                             capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=f"{REPO}:{HERE}"))
  seconds = time.perf_counter() - started
  output = completed.stdout + completed.stderr
  if completed.returncode:
    raise RuntimeError(f"{script} {' '.join(args)} exited {completed.returncode}:\n"
                       f"{output[-3000:]}")
  ratios = [match.groups() for match in map(RATIO.match, completed.stdout.splitlines())
            if match]
  return seconds, ratios, completed.stdout


def main(argv):
  del argv
  benchmarks = GPU_BENCHMARKS if _GPU.value else CPU_BENCHMARKS
  unknown = set(_ONLY.value) - set(benchmarks)
  if unknown:
    raise app.UsageError(f"--only: unknown {sorted(unknown)}; known: {', '.join(benchmarks)}")
  chosen = {name: b for name, b in benchmarks.items() if not _ONLY.value or name in _ONLY.value}
  cores = len(os.sched_getaffinity(0))
  load_before = os.getloadavg()[0]
  print(f"machine: {cpu_model()}, {cores} cores; GPU: {gpu_name()}; load average "
        f"{load_before:.1f}")
  print(versions(), flush=True)
  has_torch = importlib.util.find_spec("torch") is not None
  table, failed, started = [], [], time.perf_counter()
  for name, (script, small, tiny, needs_torch) in chosen.items():
    if needs_torch and not has_torch:
      print(f"\n== {name}: skipped (needs PyTorch: pip install -e '.[bench]')", flush=True)
      continue
    args = tiny if _TINY.value else small
    print(f"\n== {name}: python benchmarks/{script} {' '.join(args)}", flush=True)
    try:
      seconds, ratios, output = run_benchmark(script, args)
    except RuntimeError as error:  # One broken benchmark must not hide the others' figures.
      print(f"FAILED: {error}", flush=True)
      failed.append(name)
      continue
    print("\n".join(output.strip().splitlines()[-12:]))
    print(f"({seconds:.0f} s)", flush=True)
    table += [(name, ratio, value, target, seconds) for ratio, value, target in ratios]
  load_after = os.getloadavg()[0]
  label = "under load" if max(load_before, load_after) > cores / 2 else "idle cores"
  total = time.perf_counter() - started
  print(f"\n{len(table)} ratios in {total / 60:.1f} min, load average {load_before:.1f} before "
        f"and {load_after:.1f} after on {cores} cores: {label}{', tiny sizes' if _TINY.value else ''}")
  print("| benchmark | ratio | value | target | met |")
  print("| --- | --- | --- | --- | --- |")
  for name, ratio, value, target, _ in table:
    better = float(value) <= float(target) if ratio in LOWER_IS_BETTER else (
        float(value) >= float(target))
    met = "yes" if better else "no"
    print(f"| {name} | {ratio} | {value} | {target} | {met} |")
  for _, ratio, value, target, _ in table:
    print(f"ratio {ratio} {value} target {target}")
  if failed:
    sys.exit(f"benchmarks that failed: {', '.join(failed)}")


if __name__ == "__main__":
  app.run(main)
