"""Where a run's time goes, per stage, and what the persistent compilation cache saves.

Runs `pipeline.run` in a fresh child process per measurement (so nothing is compiled
before it starts) and reports per stage:
  wall       seconds of the stage;
  compile    seconds spent making XLA programs: tracing, lowering to StableHLO, and the
             backend compile (or, with a warm persistent cache, loading the program);
  programs   programs compiled (cold) or loaded from the cache (warm);
  dispatches calls of jitted functions (training steps, evaluation batches, NC updates...);
  syncs      device-to-host reads (`np.asarray`, `float()` of a jax.Array): each makes the
             host wait for the device, a round trip.
Each config runs twice with the same fresh cache directory: cold (empty cache), then warm
(a new process and work directory, the cache the cold run wrote).

Configs (`--configs`, comma-separated):
  quick        configs/cifar_patch.py:quick as it is (10 epochs; ~7 min on 2 idle cores);
  quick_short  the quick config on a short schedule (first 1,500 training / 500 test images,
               1 epoch, 2 NC steps of 2 mini-batches, 1 fine-tuning epoch): the same programs, so the same
               compile seconds, in about a minute;
  full_short   configs/cifar_patch.py (PreActResNet-18, batch 128, fp32) on the same short
               schedule, reading the shared subset: the full config's programs compile at
               their real shapes (model, batch, image; only the dataset's length differs
               from full CIFAR-10, which does not change the programs' cost to compile).
The output ends with `ratio compile_warm_vs_cold_<config> VALUE target 2`: compile seconds
of the whole run, cold over warm.

Run (from the repo root, with ../shared beside it):
  python benchmarks/stage_profile.py [--configs=quick_short,full_short] [--tiny]
`--tiny` shrinks every config further (CI: a few seconds of compute).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_CONFIGS = flags.DEFINE_list("configs", ["quick_short", "full_short"],
                             "configs to profile: quick, quick_short, full_short")
_TINY = flags.DEFINE_bool("tiny", False, "tiny models and data (CI), not for figures")
_CHILD = flags.DEFINE_string("child", "", "internal: JSON of one measurement to run here")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = dict(train_limit=1500, test_limit=500, epochs=1, reverse_steps=2, reverse_mini_batches=2,
             fine_tune_epochs=1)


def make_config(name: str, tiny: bool):
  """The config `name` (see the module docstring) on the shared subset."""
  sys.path.insert(0, REPO)
  from linfjax import config as config_lib
  config = config_lib.make_quick(config_lib.base_config())
  if name == "full_short":
    full = config_lib.base_config()
    config.model, config.train = full.model, full.train
    config.reverse.update(full.reverse.to_dict())
    config.prune.update(full.prune.to_dict())
  config.data.path = os.path.join(REPO, config_lib.SHARED_SUBSET)
  if name.endswith("_short") or tiny:
    config.data.train_limit, config.data.test_limit = SHORT["train_limit"], SHORT["test_limit"]
    config.train.epochs = SHORT["epochs"]
    config.reverse.steps = SHORT["reverse_steps"]
    config.reverse.mini_batches = SHORT["reverse_mini_batches"]
    config.reverse.checkpoint_every = SHORT["reverse_steps"]
    config.prune.fine_tune.epochs = SHORT["fine_tune_epochs"]
  if tiny:
    config.data.train_limit, config.data.test_limit = 300, 100
    config.data.clean_set_size = 100
    config.model.width = 0.125
    config.train.batch_size = 32
    config.train.eval_batch_size = 50
    config.reverse.update(steps=1, mini_batches=1, batch_size=16, checkpoint_every=1)
  return config


class _Counters:
  """Compile events, jitted calls and host syncs, attributed to the stage that is running."""

  def __init__(self):
    self.stage = "setup"
    self.totals = {}

  def add(self, key: str, value: float = 1.0) -> None:
    stage = self.totals.setdefault(self.stage, {})
    stage[key] = stage.get(key, 0.0) + value


def _instrument(counters: _Counters) -> None:
  """Hooks JAX before linfjax is imported: compile events, jitted calls, host reads."""
  import jax
  from jax import monitoring
  from jax._src import array as jax_array

  durations = {"/jax/core/compile/jaxpr_trace_duration": "compile",
               "/jax/core/compile/jaxpr_to_mlir_module_duration": "compile",
               "/jax/core/compile/backend_compile_duration": "compile"}

  def on_duration(event, seconds, **kwargs):
    del kwargs
    if event in durations:
      counters.add(durations[event], seconds)
    if event == "/jax/core/compile/backend_compile_duration":
      counters.add("programs")

  def on_event(event, **kwargs):
    del kwargs
    if event == "/jax/compilation_cache/cache_hits":
      counters.add("cache_hits")

  monitoring.register_event_duration_secs_listener(on_duration)
  monitoring.register_event_listener(on_event)

  real_jit = jax.jit

  class CountingJit:
    """A jitted function that counts its calls; everything else goes to the real one."""

    def __init__(self, jitted):
      self._jitted = jitted

    def __call__(self, *args, **kwargs):
      counters.add("dispatches")
      return self._jitted(*args, **kwargs)

    def __getattr__(self, name):
      return getattr(self._jitted, name)

  def counting_jit(fun=None, **kwargs):
    if fun is None:
      return lambda f: CountingJit(real_jit(f, **kwargs))
    return CountingJit(real_jit(fun, **kwargs))

  jax.jit = counting_jit
  real_value = jax_array.ArrayImpl._value

  def counting_value(self):
    if self._npy_value is None:
      counters.add("syncs")
    return real_value.fget(self)

  jax_array.ArrayImpl._value = property(counting_value)


def child(spec: dict) -> None:
  counters = _Counters()
  _instrument(counters)
  from linfjax.runs import compile_cache, pipeline
  compile_cache.enable(spec["cache"])
  config = make_config(spec["config"], spec["tiny"])
  stages = dict(pipeline.STAGES)
  walls = {}

  def timed(name, stage_fn):
    def run_stage(ctx):
      counters.stage = name
      started = time.perf_counter()
      try:
        return stage_fn(ctx)
      finally:
        walls[name] = time.perf_counter() - started
        counters.stage = "report"
    return run_stage

  for name, stage_fn in stages.items():
    pipeline.STAGES[name] = timed(name, stage_fn)
  started = time.perf_counter()
  pipeline.run(config, spec["workdir"], progress=False)
  total = time.perf_counter() - started
  result = {"total": total, "stages": {}}
  for name in ["setup", *stages, "report"]:
    numbers = counters.totals.get(name, {})
    result["stages"][name] = {"wall": walls.get(name), **numbers}
  print("PROFILE " + json.dumps(result))


def measure(config: str, cache: str, workdir: str, tiny: bool) -> dict:
  spec = json.dumps({"config": config, "cache": cache, "workdir": workdir, "tiny": tiny})
  started = time.perf_counter()
  completed = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={spec}"],
                             cwd=REPO, capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=REPO))
  if completed.returncode:
    raise RuntimeError(f"{config}: the child failed:\n{completed.stderr[-3000:]}")
  line = [l for l in completed.stdout.splitlines() if l.startswith("PROFILE ")][-1]
  result = json.loads(line[len("PROFILE "):])
  result["process"] = time.perf_counter() - started
  return result


def print_table(config: str, cold: dict, warm: dict) -> None:
  print(f"\n{config}: process {cold['process']:.1f} s cold, {warm['process']:.1f} s warm "
        f"(pipeline.run {cold['total']:.1f} / {warm['total']:.1f} s)")
  print("| stage | wall cold | wall warm | compile cold | compile warm | programs compiled / "
        "loaded warm | dispatches | syncs |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for stage, c in cold["stages"].items():
    w = warm["stages"].get(stage, {})
    wall = lambda d: "-" if d.get("wall") is None else f"{d['wall']:.1f}"
    print(f"| {stage} | {wall(c)} | {wall(w)} | {c.get('compile', 0):.1f} | "
          f"{w.get('compile', 0):.1f} | {int(c.get('programs', 0))} / "
          f"{int(w.get('cache_hits', 0))} | {int(c.get('dispatches', 0))} | "
          f"{int(c.get('syncs', 0))} |")


def _results(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def compile_seconds(result: dict) -> float:
  return sum(stage.get("compile", 0.0) for stage in result["stages"].values())


def main(argv):
  del argv
  if _CHILD.value:
    child(json.loads(_CHILD.value))
    return
  ratios = []
  for config in _CONFIGS.value:
    with tempfile.TemporaryDirectory(prefix="linfjax_profile_") as scratch:
      cache = os.path.join(scratch, "cache")
      cold = measure(config, cache, os.path.join(scratch, "cold"), _TINY.value)
      warm = measure(config, cache, os.path.join(scratch, "warm"), _TINY.value)
      same = [_results(os.path.join(scratch, side)) for side in ("cold", "warm")]
    print_table(config, cold, warm)
    if same[0] != same[1]:
      raise AssertionError(f"{config}: results.json differs between the cold and warm runs")
    print("results.json identical cold and warm")
    ratios.append((config, compile_seconds(cold), compile_seconds(warm)))
  for config, cold_s, warm_s in ratios:
    print(f"compile seconds, {config}: {cold_s:.1f} cold, {warm_s:.1f} warm")
  for config, cold_s, warm_s in ratios:
    print(f"ratio compile_warm_vs_cold_{config} {cold_s / max(warm_s, 1e-9):.2f} target 2")


if __name__ == "__main__":
  app.run(main)
