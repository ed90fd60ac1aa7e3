"""Command line: `python -m linfjax.main --config=configs/cifar_patch.py:quick --workdir=DIR`.

Runs the config's stages (see `linfjax.runs.pipeline`) into DIR; rerunning the same
command resumes where a killed run stopped and skips finished stages. A config with
`sweep.axes` runs a grid of runs into DIR/runs/<name>/ (see `linfjax.runs.sweep`), e.g.
`--config=configs/grid_quick.py`; `--shard=I/N` or `--distributed` share it among
processes or hosts (launch/ submits such jobs).

Any config field can be set from the command line, `--config.train.epochs=5`; every field
with its default, type, allowed values and meaning: `python -m linfjax.config`. No
CIFAR-10 beside the repository? `python -m linfjax.fetch DIR` downloads it and writes the
quick subset (then add `--config.data.path=DIR/cifar10-subset`).

A mistake (config, data, trigger, workdir, checkpoint) ends in one line on stderr saying
what is wrong, where, and the fix, with exit status 2 and the workdir left as it was;
`--verbosity=1` adds the traceback. Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import json
import logging as std_logging
import sys
import traceback
from typing import Sequence

from absl import flags, logging
from ml_collections import config_dict, config_flags

from linfjax import errors, flag_errors

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")
CONFIG_FLAG = flag_errors.CONFIG_FLAG


def _flag_values(argv: Sequence[str]) -> flags.FlagValues:
  """This command's flags, in a FlagValues of their own (so a process can parse many times)."""
  # ml_collections loads the config file as this module, re-executing into an old one if
  # present; start from none, so a name the file no longer defines is really gone.
  sys.modules.pop(flag_errors.CONFIG_MODULE, None)
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(CONFIG_FLAG, None, "Config file and variant, e.g. "
                                  "configs/cifar_patch.py:quick. Fields are overridden with "
                                  "--config.FIELD=VALUE; list them with `python -m "
                                  "linfjax.config`.", flag_values=values, lock_config=True,
                                  sys_argv=list(argv))
  flags.DEFINE_string("workdir", None, "Run directory (created; reruns resume in it).",
                      flag_values=values)
  flags.DEFINE_bool("quiet", False, "No progress bars.", flag_values=values)
  flags.DEFINE_string("shard", "", "Grids only: INDEX/COUNT, run only runs INDEX, "
                      "INDEX+COUNT, ...", flag_values=values)
  flags.DEFINE_bool("distributed", False, "Grids on several hosts: "
                    "jax.distributed.initialize(), then each process runs its own shard "
                    "(process_index/process_count).", flag_values=values)
  flags.DEFINE_string("compile_cache", "", "Directory of JAX's persistent compilation cache, "
                      "or 'off'; default $LINFJAX_COMPILE_CACHE, else "
                      "~/.cache/linfjax/jax/<cpu> (linfjax/runs/compile_cache.py).",
                      flag_values=values)
  flags.DEFINE_integer("verbosity", 0, "Logging detail: -1 warnings only, 0 progress (the "
                       "default), 1 also debug logs and the traceback of a user error.",
                       short_name="v", flag_values=values)
  return values


def _usage(values: flags.FlagValues) -> str:
  return f"{__doc__}\nflags:\n{values.get_help(include_special_flags=False)}\n"


def _parse(values: flags.FlagValues, argv: Sequence[str]) -> None:
  config_arg = flag_errors.config_argument(argv)
  flag_errors.check_config_file(config_arg)
  try:
    values(list(argv))
  except Exception as error:  # Every parse failure here is the command line's, not a bug.
    raise flag_errors.explain(error, argv) from error
  if not values.workdir:
    raise errors.UserError("--workdir is required: the run directory to create or resume, "
                           "e.g. --workdir=runs/quick")
  config = values[CONFIG_FLAG].value
  if not isinstance(config, config_dict.ConfigDict):
    try:
      config.keys()  # ml_collections stands in an object that raises the load error.
    except OSError as error:
      raise errors.UserError(f"--config={config_arg}: the config cannot be loaded "
                             f"({errors.one_line(flag_errors.innermost(error))})") from error
    raise errors.UserError(f"--config={config_arg}: get_config() returned "
                           f"{type(config).__name__}, not a ConfigDict")


def _run(values: flags.FlagValues) -> int:
  """Runs the job; returns the exit status (1: some runs of this grid process failed)."""
  import jax  # Imported here: --help and command-line mistakes answer without loading JAX.

  from linfjax.runs import compile_cache, grid, pipeline, progress, sweep
  from linfjax.reports import report

  config = values.config
  bars = not values.quiet and sys.stderr.isatty()
  logging.info("compilation cache: %s", compile_cache.enable(values.compile_cache) or "off")
  with progress.route_logging():
    if not grid.is_grid(config):
      if values.shard or values.distributed:
        raise errors.UserError("--shard and --distributed need a grid (config.sweep.axes)")
      results = pipeline.run(config, values.workdir, progress=bars)
      print(report.summary_text(values.workdir, results))
      return 0
    shard = grid.parse_shard(values.shard) if values.shard else (0, 1)
    if values.distributed:
      if values.shard:
        raise errors.UserError("--distributed takes its shard from the process index; drop "
                               "--shard")
      jax.distributed.initialize()
      shard = (jax.process_index(), jax.process_count())
    statuses = sweep.run(config, values.workdir, shard=shard, progress=bars)
  print(json.dumps(statuses, indent=1))
  failed = sweep.failure_message(statuses, values.workdir)
  if failed:  # Exit code 1, so SLURM and the launchers see the failure.
    print(failed, file=sys.stderr)
    return 1
  return 0


def _report(error: errors.UserError, verbosity: int) -> int:
  if verbosity >= 1:
    traceback.print_exc(file=sys.stderr)
  print(f"error: {errors.one_line(error)}", file=sys.stderr)
  return errors.EXIT_USER_ERROR


def cli(argv: Sequence[str]) -> int:
  """Runs the command line `argv` (argv[0] is the program); returns the exit status.

  0: done (or --help); 1: some runs of a grid process failed (each has its error.json);
  2: a user error, printed as one line on stderr. A bug raises.
  """
  values = _flag_values(argv)
  if any(arg in HELP_FLAGS for arg in argv[1:]):
    print(_usage(values))
    return 0
  flags.FLAGS.mark_as_parsed()  # absl's own flags keep their defaults; logging needs them.
  logging.use_absl_handler()
  verbosity = 0
  try:
    _parse(values, argv)
    verbosity = values.verbosity
    logging.set_verbosity(max(-1, min(verbosity, 1)))
    if verbosity < 1:  # JAX's INFO lines (e.g. "Unable to initialize backend 'tpu'") are noise.
      std_logging.getLogger("jax").setLevel(std_logging.WARNING)
    # Orbax logs every save step by step at INFO; keep linfjax's own progress readable.
    logging.get_absl_handler().addFilter(_not_orbax)
    status = _run(values)
  except errors.UserError as error:
    return _report(error, verbosity)
  except OSError as error:
    user_error = errors.from_os_error(error)
    if user_error is None:
      raise
    return _report(user_error, verbosity)
  return status


def _not_orbax(record) -> bool:
  return "orbax" not in record.pathname


if __name__ == "__main__":
  sys.exit(cli(sys.argv))
