"""What the launchers share: the flags, linfjax's command lines, config checks, printing.

A launcher builds every command as an argv list (never a shell string), prints it with
`shell_line`, so that a dry run can be pasted into a shell, and runs the lists with
`subprocess`. Arguments after `--` on a launcher's command line go to every
`linfjax.main` it starts, e.g. `-- --config.seed=1`.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Mapping, Sequence

from absl import app, flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The interpreter running the launcher runs linfjax here, and on SLURM nodes, which share
# the file system (submitit starts its own job wrapper with it too).
PYTHON = sys.executable

CONFIG = flags.DEFINE_string("config", None, "linfjax config file with optional variant, "
                             "e.g. configs/cifar_patch.py:quick.")
WORKDIR = flags.DEFINE_string("workdir", None, "linfjax work directory; a grid's runs go to "
                              "WORKDIR/runs/<name>/.")
DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print what would be run or submitted, and stop.")


def main_command(python: str, config: str, workdir: str, *,
                 shard: tuple[int, int] | None = None, distributed: bool = False,
                 quiet: bool = False, extra: Sequence[str] = ()) -> list[str]:
  """`PYTHON -m linfjax.main --config=CONFIG --workdir=DIR [...]` as an argv list.

  Args:
    python: the interpreter, argv[0].
    config: CONFIG[:VARIANT], passed as --config.
    workdir: passed as --workdir.
    shard: (index, count): the process runs only the grid's runs with
      run_index % count == index (`--shard=INDEX/COUNT`); None runs them all.
    distributed: add --distributed: `jax.distributed.initialize()`, then the process runs
      the shard `jax.process_index()/jax.process_count()`.
    quiet: add --quiet (no progress bars).
    extra: further arguments for linfjax.main, e.g. ["--config.seed=1"].
  """
  command = [python, "-m", "linfjax.main", f"--config={config}", f"--workdir={workdir}"]
  if shard is not None:
    command.append(f"--shard={shard[0]}/{shard[1]}")
  if distributed:
    command.append("--distributed")
  if quiet:
    command.append("--quiet")
  return command + list(extra)


def report_command(python: str, workdir: str) -> list[str]:
  """Rebuilds the grid report of WORKDIR from its run directories."""
  return [python, "-m", "linfjax.reports.grid_report", workdir]


def shell_line(command: Sequence[str], env: Mapping[str, str] | None = None) -> str:
  """`command` as one shell line, preceded by `env` as VAR=value assignments."""
  assignments = [f"{key}={shlex.quote(value)}" for key, value in (env or {}).items()]
  return " ".join(assignments + [shlex.join(command)])


def check_config(config: str, root: str) -> str:
  """The file part of CONFIG[:VARIANT], after checking that it is a file under `root`.

  Raises:
    app.UsageError: no such file, so no job starts only to fail on it.
  """
  path = config.split(":", 1)[0]
  if not os.path.isfile(os.path.join(root, path)):
    raise app.UsageError(f"--config={config}: no file {path} in {os.path.abspath(root)}")
  return path
