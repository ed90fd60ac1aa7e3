"""Submits linfjax to SLURM as a job array, through submitit: array task i runs shard i/ARRAY.

  python launch/slurm.py --config=configs/grid_quick.py --workdir=runs/grid --array=4 \
      --partition=gpu --dry_run
  pip install -e '.[launch]'  # submitit, for the real submission
  python launch/slurm.py --config=configs/grid_quick.py --workdir=runs/grid --array=4 \
      --partition=gpu

Task i runs `python -m linfjax.main --config=CONFIG --workdir=DIR --shard=i/ARRAY --quiet`
with this interpreter, in the directory this script was started from (SLURM nodes share the
file system), as `subprocess.run(command, check=True, cwd=...)`. Each task is one SLURM task
on one node, so --gpus_per_task is submitit's `gpus_per_node`. submitit keeps the sbatch
script, pickles and logs of every task in --slurm_logs. The dry run imports no submitit: it
prints the executor, the keyword arguments of `update_parameters` and every task's command.
Once every task has finished, `python -m linfjax.reports.grid_report DIR` builds the grid's report.
Arguments after `--` go to linfjax.main.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from typing import Any, Sequence

from absl import app, flags

if __package__ in (None, ""):  # Run as `python launch/slurm.py`: make `launch` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common

_ARRAY = flags.DEFINE_integer("array", None, "Array tasks, i.e. shards of the grid.",
                              lower_bound=1)
_PARTITION = flags.DEFINE_string("partition", None, "SLURM partition; unset, the cluster's "
                                 "default.")
_GPUS_PER_TASK = flags.DEFINE_integer("gpus_per_task", 1, "GPUs per array task.", lower_bound=0)
_CPUS_PER_TASK = flags.DEFINE_integer("cpus_per_task", 8, "CPUs per array task.", lower_bound=1)
_MEM_GB = flags.DEFINE_integer("mem_gb", 32, "Memory per array task, GB.", lower_bound=1)
_TIME_MIN = flags.DEFINE_integer("time_min", 240, "Time limit per array task, minutes.",
                                 lower_bound=1)
_SLURM_LOGS = flags.DEFINE_string("slurm_logs", None, "submitit's folder (sbatch scripts, "
                                  "logs); default WORKDIR/slurm.")
_MAX_PARALLEL = flags.DEFINE_integer("max_parallel", None, "Array tasks running at once; unset, "
                                     "submitit's default (256).", lower_bound=1)
flags.mark_flags_as_required(["config", "workdir", "array"])

def executor_parameters(*, partition: str | None, gpus_per_task: int, cpus_per_task: int,
                        mem_gb: int, time_min: int, max_parallel: int | None) -> dict[str, Any]:
  """The keyword arguments of submitit's `AutoExecutor.update_parameters`.

  Unset options are left out (the cluster's or submitit's defaults), and so are 0 GPUs,
  which would write `--gpus-per-node=0` into the sbatch script.
  """
  parameters: dict[str, Any] = {"name": "linfjax", "timeout_min": time_min, "mem_gb": mem_gb,
                                "cpus_per_task": cpus_per_task, "tasks_per_node": 1}
  if gpus_per_task:
    parameters["gpus_per_node"] = gpus_per_task
  if partition is not None:
    parameters["slurm_partition"] = partition
  if max_parallel is not None:
    parameters["slurm_array_parallelism"] = max_parallel
  return parameters


def task_commands(config: str, workdir: str, array: int, *, extra: Sequence[str] = (),
                  python: str = common.PYTHON) -> list[list[str]]:
  """Array task i's command: shard i/ARRAY of the grid, quiet."""
  return [common.main_command(python, config, workdir, shard=(i, array), quiet=True,
                              extra=extra) for i in range(array)]


def describe(folder: str, parameters: dict[str, Any], cwd: str,
             commands: Sequence[Sequence[str]]) -> list[str]:
  """The submission as the submitit calls and task commands that `submit` makes."""
  keywords = ", ".join(f"{key}={value!r}" for key, value in parameters.items())
  lines = [f"executor = submitit.AutoExecutor(folder={folder!r}, cluster='slurm')",
           f"executor.update_parameters({keywords})",
           f"jobs = executor.map_array(functools.partial(subprocess.run, check=True, "
           f"cwd={cwd!r}), commands)"]
  return lines + [f"commands[{i}]: {common.shell_line(command)}"
                  for i, command in enumerate(commands)]


def submit(folder: str, parameters: dict[str, Any], cwd: str,
           commands: Sequence[Sequence[str]]) -> list[str]:
  """Submits one array job, a task per command; returns the tasks' job ids ("JOBID_i").

  Raises:
    app.UsageError: submitit is not installed.
  """
  try:
    import submitit
  except ImportError as e:
    raise app.UsageError("submitting needs submitit: pip install -e '.[launch]'") from e
  executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
  executor.update_parameters(**parameters)
  # A stdlib function pickles by reference, so the nodes need nothing from launch/.
  run = functools.partial(subprocess.run, check=True, cwd=cwd)
  jobs = executor.map_array(run, [list(command) for command in commands])
  return [job.job_id for job in jobs]


def main(argv: Sequence[str]) -> int:
  cwd = os.getcwd()
  common.check_config(common.CONFIG.value, cwd)
  workdir = common.WORKDIR.value
  folder = _SLURM_LOGS.value or os.path.join(workdir, "slurm")
  parameters = executor_parameters(
      partition=_PARTITION.value, gpus_per_task=_GPUS_PER_TASK.value,
      cpus_per_task=_CPUS_PER_TASK.value, mem_gb=_MEM_GB.value, time_min=_TIME_MIN.value,
      max_parallel=_MAX_PARALLEL.value)
  commands = task_commands(common.CONFIG.value, workdir, _ARRAY.value, extra=argv[1:])
  print("\n".join(describe(folder, parameters, cwd, commands)), flush=True)
  if common.DRY_RUN.value:
    return 0
  for job_id in submit(folder, parameters, cwd, commands):
    print(f"submitted {job_id}")
  print("when all have finished: " + common.shell_line(common.report_command(common.PYTHON,
                                                                             workdir)))
  return 0


if __name__ == "__main__":
  app.run(main)
