"""Grids over several JAX processes (`--distributed`): process-local checkpoints, exit codes."""

import json
import os
import socket
import subprocess
import sys


from linfjax.runs import pipeline
from test_pipeline import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GRID_CONFIG = """
import sys
sys.path.insert(0, {tests!r})
from test_pipeline import tiny_config


def get_config():
  config = tiny_config({cifar!r})
  config.stages = ("train",)
  config.sweep.axes = "seed=0,1 poison.rate=0.1,0.2"
  return config
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _slurm_env(process: int, processes: int, port: int, cache: str) -> dict:
  """What SLURM sets for task `process` of a job step on this host (jax.distributed reads it),
  with the coordinator on a free local port instead of the one derived from the job id, and
  a compilation cache that both processes share."""
  return dict(os.environ, SLURM_JOB_ID="42", SLURM_NTASKS=str(processes),
              SLURM_PROCID=str(process), SLURM_LOCALID=str(process),
              SLURM_STEP_NODELIST="localhost", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
              LINFJAX_COMPILE_CACHE=cache, PYTHONPATH=REPO)


def _read(path):
  with open(path) as f:
    return json.load(f)


def test_two_processes_finish_every_run_as_alone(cifar_dir, tmp_path):
  config_file = tmp_path / "grid_config.py"
  config_file.write_text(GRID_CONFIG.format(tests=os.path.join(REPO, "tests"), cifar=cifar_dir))
  workdir = str(tmp_path / "grid")
  port = _free_port()
  processes = [subprocess.Popen(
      [sys.executable, "-m", "linfjax.main", f"--config={config_file}", f"--workdir={workdir}",
       "--distributed", "--quiet"], env=_slurm_env(i, 2, port, str(tmp_path / "cache")), cwd=REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [process.communicate(timeout=600) for process in processes]
  for process, (stdout, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]
  statuses = [json.loads(stdout[stdout.index("{"):]) for stdout, _ in outputs]
  # Process i takes runs i, i+2: the two poison rates of seed 0 and of seed 1 split.
  assert statuses == [{"seed=0,poison.rate=0.1": "finished", "seed=1,poison.rate=0.1": "finished"},
                      {"seed=0,poison.rate=0.2": "finished", "seed=1,poison.rate=0.2": "finished"}]
  assert len(os.listdir(tmp_path / "cache")) > 10  # The compiled programs, shared on disk.
  alone_config = tiny_config(cifar_dir)
  alone_config.stages = ("train",)
  for seed, rate in ((0, 0.2), (1, 0.1)):
    alone_config.seed, alone_config.poison.rate = seed, rate
    alone = pipeline.run(alone_config, str(tmp_path / f"alone_{seed}_{rate}"), progress=False)
    in_grid = _read(os.path.join(workdir, "runs", f"seed={seed},poison.rate={rate}",
                                 "results.json"))
    assert in_grid == alone


FAILING_GRID = """
import sys
sys.path.insert(0, {tests!r})
from linfjax import main
from linfjax.runs import pipeline
from test_pipeline import tiny_config


def broken_run(config, *args, **kwargs):
  raise RuntimeError(f"disk full in seed {{config.seed}}")


pipeline.run = broken_run
sys.exit(main.cli(["linfjax.main", "--config={config_file}", "--workdir={workdir}", "--quiet"]))
"""


def test_grid_process_whose_runs_failed_exits_non_zero_and_says_how_many(cifar_dir, tmp_path):
  config_file = tmp_path / "grid_config.py"
  config_file.write_text(GRID_CONFIG.format(tests=os.path.join(REPO, "tests"), cifar=cifar_dir))
  workdir = str(tmp_path / "grid")
  script = FAILING_GRID.format(tests=os.path.join(REPO, "tests"), config_file=config_file,
                               workdir=workdir)
  completed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                             text=True, timeout=300,
                             env=dict(os.environ, PYTHONPATH=REPO, LINFJAX_COMPILE_CACHE="off"))
  assert completed.returncode == 1
  assert "grid: 4 of 4 runs of this process failed (seed=0,poison.rate=0.1," in completed.stderr
  error = _read(os.path.join(workdir, "runs", "seed=1,poison.rate=0.2", "error.json"))
  assert error["message"] == "disk full in seed 1"
