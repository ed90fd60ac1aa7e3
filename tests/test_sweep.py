"""Grids in one process: same results as separate runs, compiled once, resumable, sharded."""

import collections
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax import monitoring

from linfjax import config as config_lib
from linfjax.runs import lockstep, pipeline, sweep
from linfjax.runs.stages import train as train_stage
from test_pipeline import tiny_config

COMPILES = collections.Counter()
REAL_RUN = pipeline.run


def _count_compiles(event, duration, **kwargs):
  del duration, kwargs
  if event == "/jax/core/compile/backend_compile_duration":
    COMPILES["backend"] += 1


monitoring.register_event_duration_secs_listener(_count_compiles)


def tiny_grid(cifar_dir, axes):
  config = tiny_config(cifar_dir)
  config.stages = ("train", "prune")
  config.prune.real_defenses = ("linf", "l2", "l1")
  config.sweep.axes = axes
  return config


def count_compiles_per_run(monkeypatch) -> list[int]:
  """Patches pipeline.run to append each run's number of XLA compilations to the list."""
  compiles_per_run = []
  real_run = pipeline.run

  def counting_run(*args, **kwargs):
    before = COMPILES["backend"]
    result = real_run(*args, **kwargs)
    compiles_per_run.append(COMPILES["backend"] - before)
    return result

  monkeypatch.setattr(pipeline, "run", counting_run)
  return compiles_per_run


def read_results(directory):
  with open(os.path.join(directory, "results.json")) as f:
    return json.load(f)


def test_grid_equals_separate_runs_and_compiles_once(cifar_dir, tmp_path, monkeypatch):
  config = tiny_grid(cifar_dir, "seed=0,1 poison.target=2,5")
  jax.clear_caches()  # Earlier tests compiled the same shapes; the first run must compile.
  compiles_per_run = count_compiles_per_run(monkeypatch)
  statuses = sweep.run(config, str(tmp_path / "grid"), progress=False)
  assert list(statuses) == ["seed=0,poison.target=2", "seed=0,poison.target=5",
                            "seed=1,poison.target=2", "seed=1,poison.target=5"]
  assert set(statuses.values()) == {"finished"}
  assert compiles_per_run[0] > 10 and compiles_per_run[1:] == [0, 0, 0]

  with open(tmp_path / "grid" / "grid.json") as f:
    described = json.load(f)
  assert described["axes"] == [{"field": "seed", "values": [0, 1]},
                               {"field": "poison.target", "values": [2, 5]}]
  assert described["runs"][3] == {"name": "seed=1,poison.target=5",
                                  "values": {"seed": 1, "poison.target": 5}}

  separate = tiny_grid(cifar_dir, "")
  separate.seed, separate.poison.target = 1, 5
  monkeypatch.undo()
  alone = pipeline.run(separate, str(tmp_path / "alone"), progress=False)
  in_grid = read_results(tmp_path / "grid" / "runs" / "seed=1,poison.target=5")
  assert in_grid == alone
  with open(tmp_path / "grid" / "runs" / "seed=1,poison.target=5" / "config.json") as f:
    assert json.load(f)["poison"]["target"] == 5
  assert (tmp_path / "grid" / "grid_report.html").exists()


def test_poison_rate_and_trigger_parameters_do_not_recompile(cifar_dir, tmp_path, monkeypatch):
  config = tiny_grid(cifar_dir, "poison.rate=0.1,0.3 trigger.size=2,4")
  config.stages = ("train",)
  compiles_per_run = count_compiles_per_run(monkeypatch)
  sweep.run(config, str(tmp_path / "grid"), progress=False)
  poisoned = [read_results(tmp_path / "grid" / "runs" / name)["train"]["poisoned"]
              for name in ("poison.rate=0.1,trigger.size=2", "poison.rate=0.3,trigger.size=4")]
  assert poisoned == [8, 24]
  assert compiles_per_run[1:] == [0, 0, 0]


def record_runs(monkeypatch, *, fail_seed=None, error=None) -> list[int]:
  """Patches pipeline.run to record each run's seed and raise `error` for seed `fail_seed`."""
  seeds = []

  def recording_run(run_config, *args, **kwargs):
    seeds.append(run_config.seed)
    if run_config.seed == fail_seed:
      raise error
    return REAL_RUN(run_config, *args, **kwargs)

  monkeypatch.setattr(pipeline, "run", recording_run)
  return seeds


def test_failed_run_is_recorded_and_retried(cifar_dir, tmp_path, monkeypatch):
  config = tiny_grid(cifar_dir, "seed=0,1")
  config.stages = ("train",)
  workdir = str(tmp_path / "grid")
  record_runs(monkeypatch, fail_seed=0, error=RuntimeError("disk full"))
  assert sweep.run(config, workdir, progress=False) == {"seed=0": "failed", "seed=1": "finished"}
  with open(os.path.join(workdir, "runs", "seed=0", "error.json")) as f:
    error = json.load(f)
  assert error["error"] == "RuntimeError" and error["message"] == "disk full"
  assert "recording_run" in error["traceback"]

  ran = record_runs(monkeypatch)
  assert sweep.run(config, workdir, progress=False) == {"seed=0": "finished", "seed=1": "finished"}
  assert ran == [0]
  assert not os.path.exists(os.path.join(workdir, "runs", "seed=0", "error.json"))


def test_killed_grid_resumes_only_unfinished_runs(cifar_dir, tmp_path, monkeypatch):
  config = tiny_grid(cifar_dir, "seed=0,1,2")
  config.stages = ("train",)
  workdir = str(tmp_path / "grid")
  record_runs(monkeypatch, fail_seed=1, error=KeyboardInterrupt())
  with pytest.raises(KeyboardInterrupt):
    sweep.run(config, workdir, progress=False)
  finished = read_results(os.path.join(workdir, "runs", "seed=0"))
  ran = record_runs(monkeypatch)
  statuses = sweep.run(config, workdir, progress=False)
  assert ran == [1, 2]
  assert set(statuses.values()) == {"finished"}
  assert read_results(os.path.join(workdir, "runs", "seed=0")) == finished


def test_shards_split_the_runs(cifar_dir, tmp_path, monkeypatch):
  config = tiny_grid(cifar_dir, "seed=0,1,2,3,4")
  ran = []
  monkeypatch.setattr(pipeline, "run", lambda run_config, *a, **k: ran.append(run_config.seed))
  sweep.run(config, str(tmp_path / "grid"), shard=(1, 2), progress=False)
  assert ran == [1, 3]


def test_bad_run_stops_the_grid_before_any_compute(cifar_dir, tmp_path, monkeypatch):
  config = tiny_grid(cifar_dir, "trigger.size=3,40")
  monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("a run started"))
  with pytest.raises(config_lib.ConfigError, match="grid run trigger.size=40: .*does not fit"):
    sweep.run(config, str(tmp_path / "grid"), progress=False)
  assert not os.path.exists(tmp_path / "grid")


def test_changed_base_config_is_refused_before_any_compute(cifar_dir, tmp_path, monkeypatch):
  config = tiny_grid(cifar_dir, "seed=0,1")
  config.stages = ("train",)
  workdir = str(tmp_path / "grid")
  sweep.run(config, workdir, progress=False)
  config.train.epochs = 3
  monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("a run started"))
  with pytest.raises(pipeline.WorkdirError, match="train.epochs: 2 in the workdir, 3 now"):
    sweep.run(config, workdir, progress=False)


SHARDED_GRID = """
import json, sys
sys.path.insert(0, "tests")
import jax
from linfjax.runs import lockstep, sweep
from test_pipeline import tiny_config
assert jax.local_device_count() == 8, jax.devices()
groups, real_fit = [], lockstep.fit
lockstep.fit = lambda states, *a, **k: groups.append(len(states)) or real_fit(states, *a, **k)
config = tiny_config(sys.argv[1])
config.stages = ("train",)
config.sweep.axes = "seed=0,1"
statuses = sweep.run(config, sys.argv[2], progress=False)
print(json.dumps({"statuses": statuses, "groups": groups}))
"""


def _trained_params(config, workdir, kind):
  ctx = pipeline.make_context(config, workdir, progress=False)
  return train_stage.load_trained(ctx, kind)[1]["params"]


def test_sharded_over_8_devices_equals_unsharded(cifar_dir, tmp_path):
  config = tiny_grid(cifar_dir, "seed=0,1")
  config.stages = ("train",)
  unsharded = str(tmp_path / "unsharded")
  sweep.run(config, unsharded, progress=False)
  sharded = str(tmp_path / "sharded")
  # 8 emulated devices share 2 cores: on a loaded machine a device thread can reach an
  # all-reduce after XLA's 40 s rendezvous limit, which aborts the process; allow 10 min.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             "--xla_cpu_collective_call_terminate_timeout_seconds=600")
  completed = subprocess.run([sys.executable, "-c", SHARDED_GRID, cifar_dir, sharded], env=env,
                             cwd=os.path.dirname(os.path.dirname(__file__)),
                             capture_output=True, text=True, timeout=600)
  assert completed.returncode == 0, completed.stderr[-3000:]
  outcome = json.loads(completed.stdout.strip().splitlines()[-1])
  assert outcome == {"statuses": {"seed=0": "finished", "seed=1": "finished"}, "groups": [4]}
  for name in ("seed=0", "seed=1"):
    a = read_results(os.path.join(unsharded, "runs", name))["train"]
    b = read_results(os.path.join(sharded, "runs", name))["train"]
    assert a["poisoned"] == b["poisoned"]
    for kind in ("backdoored", "vanilla"):
      for metric in ("CA", "ASR", "RA"):
        assert abs(a[kind][metric] - b[kind][metric]) <= 100 / 30 + 1e-6, (name, kind, metric)
  run_config = tiny_grid(cifar_dir, "")
  run_config.stages = ("train",)
  for seed in (0, 1):
    run_config.seed = seed
    for kind in ("backdoored", "vanilla"):
      alone = _trained_params(run_config, os.path.join(unsharded, "runs", f"seed={seed}"), kind)
      lockstep = _trained_params(run_config, os.path.join(sharded, "runs", f"seed={seed}"), kind)
      differences = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), alone, lockstep)
      assert max(jax.tree.leaves(differences)) < 1e-3, (seed, kind)


def test_lockstep_on_one_device_and_its_failure_falls_back_to_single_runs(cifar_dir, tmp_path,
                                                                          monkeypatch):
  config = tiny_grid(cifar_dir, "seed=0,1")
  config.stages = ("train",)
  config.sweep.models_per_device = 2
  groups = []
  real_fit = lockstep.fit
  monkeypatch.setattr(lockstep, "fit",
                      lambda states, *a, **k: groups.append(len(states)) or real_fit(states, *a, **k))
  assert set(sweep.run(config, str(tmp_path / "lockstep"), progress=False).values()) == {"finished"}
  assert groups == [2, 2]  # Two models per group on the one device.

  def broken_fit(*args, **kwargs):
    raise RuntimeError("device lost")

  monkeypatch.setattr(lockstep, "fit", broken_fit)
  statuses = sweep.run(config, str(tmp_path / "fallback"), progress=False)
  assert statuses == {"seed=0": "finished", "seed=1": "finished"}
  for name in ("seed=0", "seed=1"):
    together = read_results(tmp_path / "lockstep" / "runs" / name)["train"]
    alone = read_results(tmp_path / "fallback" / "runs" / name)["train"]
    for kind in ("backdoored", "vanilla"):
      assert abs(together[kind]["CA"] - alone[kind]["CA"]) <= 100 / 30 + 1e-6, (name, kind)
