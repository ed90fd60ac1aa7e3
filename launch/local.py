"""Runs linfjax on this machine: one process, or P processes that split a grid's runs.

  python launch/local.py --config=configs/grid_quick.py --workdir=runs/grid --processes=2 --dry_run
  python launch/local.py --config=configs/grid_quick.py --workdir=runs/grid --processes=2

With --processes=1 this runs `python -m linfjax.main --config=CONFIG --workdir=DIR`. With P
processes it starts P at once, process i with `--shard=i/P --quiet` (and with
--devices_per_process=D, CUDA_VISIBLE_DEVICES=i*D,...,i*D+D-1: GPUs counted from 0 in the
order CUDA lists them), waits for all, prints each exit code, then rebuilds the grid report
with `python -m linfjax.reports.grid_report DIR`, also when a shard failed. The exit code is 0 only
if every process succeeded. --dry_run prints the same as a shell script. Arguments after
`--` go to linfjax.main.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

from absl import app, flags

if __package__ in (None, ""):  # Run as `python launch/local.py`: make `launch` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common

_PROCESSES = flags.DEFINE_integer("processes", 1, "Processes to run at once; with more than "
                                  "one, process i runs shard i/PROCESSES.", lower_bound=1)
_DEVICES_PER_PROCESS = flags.DEFINE_integer(
    "devices_per_process", None, "GPUs per process, set through CUDA_VISIBLE_DEVICES; unset, "
    "every process sees every device.", lower_bound=1)
flags.mark_flags_as_required(["config", "workdir"])

# One process to start: the variables it adds to the environment, and its argv.
Job = tuple[dict[str, str], list[str]]


def jobs(config: str, workdir: str, processes: int, *, devices_per_process: int | None = None,
         extra: Sequence[str] = (), python: str = common.PYTHON) -> list[Job]:
  """The processes to start: the plain command for one, shards i/P (quiet) for P."""
  result = []
  for i in range(processes):
    env = {}
    if devices_per_process is not None:
      first = i * devices_per_process
      env["CUDA_VISIBLE_DEVICES"] = ",".join(
          str(d) for d in range(first, first + devices_per_process))
    shard = (i, processes) if processes > 1 else None
    result.append((env, common.main_command(python, config, workdir, shard=shard,
                                            quiet=processes > 1, extra=extra)))
  return result


def script(to_start: Sequence[Job], report: Sequence[str] | None) -> list[str]:
  """What `jobs` and the report do, as shell lines: several jobs in parallel, then `wait`."""
  if len(to_start) == 1:
    return [common.shell_line(command, env) for env, command in to_start]
  lines = [common.shell_line(command, env) + " &" for env, command in to_start]
  return lines + ["wait", common.shell_line(report)]


def run_parallel(to_start: Sequence[Job]) -> list[int]:
  """Starts every job at once (os.environ plus the job's variables), waits for all of
  them, and returns their exit codes in order."""
  started = [subprocess.Popen(command, env={**os.environ, **env}) for env, command in to_start]
  return [process.wait() for process in started]


def main(argv: Sequence[str]) -> int:
  common.check_config(common.CONFIG.value, ".")
  processes = _PROCESSES.value
  workdir = common.WORKDIR.value
  to_start = jobs(common.CONFIG.value, workdir, processes,
                  devices_per_process=_DEVICES_PER_PROCESS.value, extra=argv[1:])
  report = common.report_command(common.PYTHON, workdir) if processes > 1 else None
  if common.DRY_RUN.value:
    print("\n".join(script(to_start, report)))
    return 0
  for env, command in to_start:
    print(common.shell_line(command, env), flush=True)
  codes = run_parallel(to_start)
  if report is None:
    return codes[0]
  for i, code in enumerate(codes):
    print(f"shard {i}/{processes}: exit code {code}", flush=True)
  print(common.shell_line(report), flush=True)
  report_code = subprocess.run(report, check=False).returncode
  return 0 if report_code == 0 and not any(codes) else 1


if __name__ == "__main__":
  app.run(main)
