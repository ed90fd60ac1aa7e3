"""What a command line that does not parse means, in one line (for `linfjax.main`).

absl and ml_collections report a bad command line as chained tracebacks: a typo in
`--config.poison.rat=0.2` ends in an escaped "Did you mean", a config file that does not
load surfaces only when the config is first used. `explain` turns any such failure into a
`UserError` that names the flag or file, what is wrong and the fix; `check_config_file`
catches a missing file before ml_collections does.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Any, Sequence

from absl import flags
from ml_collections import config_dict, config_flags

from linfjax import errors

CONFIG_FLAG = "config"
# The module name ml_collections loads a config file as (it re-executes into an old one).
CONFIG_MODULE = f"{CONFIG_FLAG}_config"


def config_argument(argv: Sequence[str]) -> str | None:
  """The value of --config in argv (None when absent)."""
  for i, arg in enumerate(argv):
    for prefix in (f"--{CONFIG_FLAG}=", f"-{CONFIG_FLAG}="):
      if arg.startswith(prefix):
        return arg[len(prefix):]
    if arg in (f"--{CONFIG_FLAG}", f"-{CONFIG_FLAG}") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def innermost(error: BaseException) -> BaseException:
  """The first exception of a chain (what was raised before the re-raises)."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return error


def load_config(config_arg: str) -> Any:
  """What `--config=config_arg` gives without overrides (raises when the file cannot load)."""
  sys.modules.pop(CONFIG_MODULE, None)
  argv = ["linfjax", f"--{CONFIG_FLAG}={config_arg}"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(CONFIG_FLAG, None, "", flag_values=values, lock_config=False,
                                  sys_argv=argv)
  values(argv)
  config = values[CONFIG_FLAG].value
  if not isinstance(config, config_dict.ConfigDict):
    getattr(config, "keys", None)  # ml_collections' stand-in raises the load error here.
  return config


def check_config_file(config_arg: str | None) -> None:
  """Raises a UserError when --config is absent or names no file."""
  if not config_arg:
    raise errors.UserError("--config is required, e.g. --config=configs/cifar_patch.py:quick "
                           "(see --help)")
  path = config_arg.split(":", 1)[0]
  if not os.path.isfile(path):
    here = os.path.dirname(path) or "."
    known = sorted(f for f in os.listdir(here) if f.endswith(".py")) if os.path.isdir(here) else []
    listing = f"; {here} holds {', '.join(known)}" if known else ""
    raise errors.UserError(f"--config={config_arg}: no config file {path!r} (the working "
                           f"directory is {os.getcwd()}){listing}")


def _unknown_override(config: Any, config_arg: str, argv: Sequence[str]) -> str | None:
  """A message for the first --config.FIELD in argv that the config lacks, if any."""
  if not isinstance(config, config_dict.ConfigDict):
    return (f"--{CONFIG_FLAG}={config_arg}: get_config() returned {type(config).__name__}, "
            "not a ConfigDict")
  for arg in argv[1:]:
    name = arg.lstrip("-").split("=", 1)[0]
    if not name.startswith(f"{CONFIG_FLAG}."):
      continue
    node, walked = config, CONFIG_FLAG
    for part in name.split(".")[1:]:
      if not isinstance(node, config_dict.ConfigDict):
        return f"--{name}: {walked} is a value, not a block; set it as --{walked}=VALUE"
      if part not in node:
        known = sorted(node.keys())
        close = difflib.get_close_matches(part, known, n=1)
        hint = f"did you mean --{walked}.{close[0]}? " if close else ""
        return (f"--{name}: {walked} has no field {part!r}; {hint}known: {', '.join(known)} "
                "(every field: python -m linfjax.config)")
      node, walked = node[part], f"{walked}.{part}"
  return None


def _field_type(config: Any, path: str) -> str | None:
  """The type name of field `path` ('config.a.b'), if the config has it."""
  node = config
  for part in path.split(".")[1:]:
    if not isinstance(node, config_dict.ConfigDict) or part not in node:
      return None
    node = node[part]
  return type(node).__name__


def explain(error: BaseException, argv: Sequence[str]) -> errors.UserError:
  """One line for a command line that did not parse (flags, config file, overrides)."""
  config_arg = config_argument(argv)
  try:
    config = load_config(config_arg) if config_arg else None
  except Exception:  # The file itself does not load: `error` says why.
    config = None
  if config is not None:
    unknown = _unknown_override(config, config_arg, argv)
    if unknown:
      return errors.UserError(unknown)
  inner = innermost(error)
  if isinstance(error, flags.UnrecognizedFlagError):
    return errors.UserError(f"{errors.one_line(error)}; the flags are listed by --help")
  if isinstance(inner, errors.UserError):
    return errors.UserError(f"--config={config_arg}: {errors.one_line(inner)}")
  if isinstance(inner, SyntaxError):
    return errors.UserError(f"--config={config_arg}: the config file does not parse "
                            f"({inner.msg}, {inner.filename} line {inner.lineno}); fix it")
  first_line = str(error).split("\n", 1)[0]
  if isinstance(error, flags.Error) and "Error whilst parsing config file" not in first_line:
    override = re.match(rf"flag --({CONFIG_FLAG}\.[\w.]+)=", first_line)
    held = _field_type(config, override.group(1)) if override and config is not None else None
    hint = f"; {override.group(1)} holds a {held} (python -m linfjax.config)" if held else ""
    return errors.UserError(first_line.removeprefix("flag ").rstrip(": ") + hint)
  where = f"--config={config_arg}" if config_arg else "the command line"
  return errors.UserError(f"{where}: {type(inner).__name__}: {errors.one_line(inner)} (run "
                          "with --verbosity=1 for the traceback)")
