"""Kill-safety: SIGKILL the pipeline at a random moment inside a stage, rerun, compare results.

    python tests/kill_harness.py --trials=20            # every stage and the grid, 20 each
    python tests/kill_harness.py --trials=3 --stages=train,prune --keep=/tmp/kills

A trial runs `python -m linfjax.main` on a tiny CIFAR-layout dataset (100 training images,
a 1/8-width CNN, every stage) in a subprocess, watches its log for the stage's first line
(`stage X: running`, `report: writing`, `grid: running`), sends SIGKILL after a delay drawn
uniformly over that stage's duration in an uninterrupted reference run, then reruns the
same command to the end and compares its results.json with the reference's: integers,
strings and nulls equal, floats within FLOAT_TOLERANCE (relative to max(1, |value|)).
A trial passes when the killed process was killed inside the stage, the rerun exits 0,
report.html exists and results.json matches. A kill that came too late (the process had
finished) is retried with half the delay's range, up to KILL_TRIES times, then counted as
missed, not passed. Trials of a later stage start from a copy of the reference workdir
with that stage and the later ones removed, so each trial runs only what it needs. The grid trial kills a 2-run grid
anywhere in its run and compares every run's results.json.

Processes share a persistent JAX compilation cache (in the work folder), so only the first
compiles. The last line printed is `N passed, M failed`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import write_cifar_dir  # noqa: E402

STAGES = ("train", "reverse", "analysis", "prune", "report")
FLOAT_TOLERANCE = 1e-6
KILL_TRIES = 6  # Each retry halves the delay's range: a 1 s stage is still hit on a loaded machine.
MARKERS = {**{stage: f"stage {stage}: running" for stage in STAGES[:-1]},
           "report": "report: writing", "grid": "grid: running"}
TINY = ["--config.data.clean_set_size=20", "--config.model.width=0.125",
        "--config.train.epochs=2", "--config.train.batch_size=16",
        "--config.train.eval_batch_size=32", "--config.poison.rate=0.2",
        "--config.reverse.steps=4", "--config.reverse.mini_batches=1",
        "--config.reverse.checkpoint_every=1", "--config.prune.fine_tune.epochs=1", "--quiet"]


@dataclasses.dataclass
class Setup:
  """Where the trials run and the command they run."""
  root: str
  data_dir: str
  env: dict

  def command(self, workdir: str, *, grid: bool = False) -> list[str]:
    axes = ["--config.sweep.axes=seed=0,1"] if grid else []
    return [sys.executable, "-m", "linfjax.main",
            f"--config={os.path.join(REPO_ROOT, 'configs', 'cifar_patch.py')}:quick",
            f"--config.data.path={self.data_dir}", f"--workdir={workdir}", *TINY, *axes]


def make_setup(root: str) -> Setup:
  data_dir = os.path.join(root, "data")
  if not os.path.isdir(data_dir):
    write_cifar_dir(data_dir)
  env = {**os.environ, "PYTHONPATH": REPO_ROOT,
         "JAX_COMPILATION_CACHE_DIR": os.path.join(root, "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
  return Setup(root, data_dir, env)


@dataclasses.dataclass
class Outcome:
  """One process: its exit status, when each marker appeared (seconds from start), its log."""
  returncode: int
  markers: list[tuple[str, float]]
  seconds: float
  log: str
  killed_in: str | None = None


def _marker_of(line: str) -> str | None:
  for name, text in MARKERS.items():
    if text in line:
      return name
  return None


def run(setup: Setup, workdir: str, *, grid: bool = False, kill_stage: str | None = None,
        delay: float = 0.0, timeout: float = 900) -> Outcome:
  """Runs the command; with `kill_stage`, SIGKILLs it `delay` s after that stage's marker."""
  started = time.monotonic()
  process = subprocess.Popen(setup.command(workdir, grid=grid), cwd=REPO_ROOT, env=setup.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  markers, lines = [], []
  armed = threading.Event()

  def read():
    for line in process.stderr:
      lines.append(line)
      name = _marker_of(line)
      if name is not None:
        markers.append((name, time.monotonic() - started))
        if name == kill_stage:
          armed.set()

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  killed_in = None
  if kill_stage is not None:
    while not armed.wait(0.05):
      if process.poll() is not None or time.monotonic() - started > timeout:
        break
    if armed.is_set() and not _sleep_unless_done(process, delay):
      killed_in = markers[-1][0]
      process.send_signal(signal.SIGKILL)
  try:
    process.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
  reader.join(timeout=10)
  return Outcome(process.returncode, markers, time.monotonic() - started, "".join(lines),
                 killed_in)


def _sleep_unless_done(process: subprocess.Popen, seconds: float) -> bool:
  """Sleeps `seconds`; True if the process ended first."""
  end = time.monotonic() + seconds
  while time.monotonic() < end:
    if process.poll() is not None:
      return True
    time.sleep(min(0.02, max(0.0, end - time.monotonic())))
  return process.poll() is not None


def durations(outcome: Outcome) -> dict[str, float]:
  """Each marker's stage duration: until the next marker (the last: until the process ended)."""
  times = outcome.markers + [("end", outcome.seconds)]
  out = {}
  for (name, start), (_, end) in zip(times, times[1:]):
    out.setdefault(name, end - start)
  if "grid" in out:  # A grid trial may kill anywhere from its first run on.
    out["grid"] = outcome.seconds - dict(outcome.markers)["grid"]
  return out


def differences(expected, actual, path: str = "") -> list[str]:
  """Where two results trees differ beyond FLOAT_TOLERANCE (empty when they match)."""
  if isinstance(expected, dict) and isinstance(actual, dict):
    out = [f"{path}.{key}: missing on one side" for key in set(expected) ^ set(actual)]
    for key in expected.keys() & actual.keys():
      out += differences(expected[key], actual[key], f"{path}.{key}")
    return out
  if isinstance(expected, list) and isinstance(actual, list):
    if len(expected) != len(actual):
      return [f"{path}: {len(expected)} items vs {len(actual)}"]
    return [d for i, (e, a) in enumerate(zip(expected, actual))
            for d in differences(e, a, f"{path}.{i}")]
  if isinstance(expected, float) and isinstance(actual, float):
    if abs(expected - actual) <= FLOAT_TOLERANCE * max(1.0, abs(expected), abs(actual)):
      return []
    return [f"{path}: {expected!r} vs {actual!r}"]
  return [] if expected == actual and type(expected) is type(actual) else \
      [f"{path}: {expected!r} vs {actual!r}"]


def _results(workdir: str) -> dict | None:
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def start_from(reference_dir: str, workdir: str, stage: str) -> None:
  """The reference workdir as it was when `stage` began (nothing for train)."""
  if stage in ("train", "grid"):
    return
  shutil.copytree(reference_dir, workdir)
  later = STAGES[STAGES.index(stage):]
  for name in later:
    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
  os.remove(os.path.join(workdir, "report.html"))
  results = _results(workdir)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({k: v for k, v in results.items() if k not in later}, f)


@dataclasses.dataclass
class Reference:
  workdir: str
  durations: dict[str, float]
  results: dict  # workdir (or grid run name) -> results.json


def reference(setup: Setup, *, grid: bool = False, warm: bool = True) -> Reference:
  """An uninterrupted run, timed with a warm compilation cache (as the trials run) unless
  `warm=False` (then one run, whose stage times include compiling)."""
  workdir = os.path.join(setup.root, "reference_grid" if grid else "reference")
  cache = setup.env["JAX_COMPILATION_CACHE_DIR"]
  if warm and (not os.path.isdir(cache) or not os.listdir(cache)):
    shutil.rmtree(workdir, ignore_errors=True)
    run(setup, workdir, grid=grid)  # Fills the cache; its timings include compiling.
  shutil.rmtree(workdir, ignore_errors=True)
  outcome = run(setup, workdir, grid=grid)
  if outcome.returncode != 0:
    raise RuntimeError(f"the reference run failed:\n{outcome.log[-3000:]}")
  return Reference(workdir, durations(outcome), _collect(workdir, grid))


def _collect(workdir: str, grid: bool) -> dict:
  if not grid:
    return {"": _results(workdir)}
  runs = os.path.join(workdir, "runs")
  return {name: _results(os.path.join(runs, name)) for name in sorted(os.listdir(runs))}


def trial(setup: Setup, ref: Reference, stage: str, rng: random.Random,
          name: str) -> tuple[str, str]:
  """One kill and rerun; returns (verdict 'passed' / 'failed' / 'missed', detail)."""
  grid = stage == "grid"
  workdir = os.path.join(setup.root, "trials", name)
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  start_from(ref.workdir, workdir, stage)
  span = ref.durations[stage]
  killed = None
  for _ in range(KILL_TRIES):  # A kill that came after the process ended is retried sooner.
    delay = rng.uniform(0.0, span)
    killed = run(setup, workdir, grid=grid, kill_stage=stage, delay=delay)
    if killed.killed_in is not None:
      break
    if killed.returncode != 0:
      return "failed", f"the run to be killed failed by itself:\n{killed.log[-2000:]}"
    shutil.rmtree(workdir, ignore_errors=True)
    start_from(ref.workdir, workdir, stage)
    span = delay * 0.5
  else:
    return "missed", f"the process ended before every kill (last delay {delay:.2f} s)"
  rerun = run(setup, workdir, grid=grid)
  where = f"killed {delay:.2f} s into {stage} (log: in {killed.killed_in})"
  if rerun.returncode != 0:
    return "failed", f"{where}; the rerun exited {rerun.returncode}:\n{rerun.log[-3000:]}"
  found = _collect(workdir, grid)
  problems = [f"{key or 'results'}: {d}" for key, expected in ref.results.items()
              for d in (differences(expected, found.get(key)) if found.get(key) is not None
                        else ["results.json missing"])]
  report = os.path.join(workdir, "grid_report.html" if grid else "report.html")
  if not os.path.exists(report):
    problems.append(f"{report} missing")
  return ("failed", f"{where}; " + "; ".join(problems[:5])) if problems else ("passed", where)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--trials", type=int, default=20, help="trials per stage")
  parser.add_argument("--stages", default=",".join((*STAGES, "grid")))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--keep", default="", help="work folder to use and keep (default: a "
                      "temporary one, removed at the end)")
  args = parser.parse_args(argv[1:])
  stages = args.stages.split(",")
  root = args.keep or tempfile.mkdtemp(prefix="linfjax-kills-")
  os.makedirs(root, exist_ok=True)
  rng = random.Random(args.seed)
  setup = make_setup(root)
  tally = {stage: {"passed": 0, "failed": 0, "missed": 0} for stage in stages}
  try:
    refs = {}
    if set(stages) - {"grid"}:
      refs["run"] = reference(setup)
      print(f"reference run: stage seconds {_rounded(refs['run'].durations)}", flush=True)
    if "grid" in stages:
      refs["grid"] = reference(setup, grid=True)
      print(f"reference grid: {_rounded(refs['grid'].durations)}", flush=True)
    for i in range(args.trials):  # Round by round, so a run cut short covers every stage.
      for stage in stages:
        ref = refs["grid" if stage == "grid" else "run"]
        verdict, detail = trial(setup, ref, stage, rng, f"{stage}_{i}")
        tally[stage][verdict] += 1
        print(f"{stage} trial {i}: {verdict}: {detail}", flush=True)
    for stage, counts in tally.items():
      print(f"{stage}: {counts['passed']} passed of {sum(counts.values())} ({counts['failed']} "
            f"failed, {counts['missed']} missed)")
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  passed = sum(c["passed"] for c in tally.values())
  failed = sum(c["failed"] + c["missed"] for c in tally.values())
  print(f"{passed} passed, {failed} failed")
  return 0 if failed == 0 else 1


def _rounded(values: dict[str, float]) -> dict[str, float]:
  return {key: round(value, 1) for key, value in values.items()}


if __name__ == "__main__":
  sys.exit(main(sys.argv))
