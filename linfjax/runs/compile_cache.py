"""JAX's persistent compilation cache: compiled programs kept on disk for the next process.

Every `python -m linfjax.main` process, every shard of a grid and every host of a pod
compiles the same jitted functions (the train step, metrics, Neural Cleanse, norms,
Grad-CAM, pruning sweeps) for the same shapes. With the cache on, the first process
writes each compiled program to a directory and later ones load it instead of
compiling (benchmarks/compile_cache.py measures the seconds per stage, cold and warm).
Results do not change: a cached program is the one XLA would compile.

Where the cache lives, in this order:
  1. `setting` given to `enable` (`linfjax.main --compile_cache=DIR`), or "off";
  2. the environment variable LINFJAX_COMPILE_CACHE (a directory, or "off");
  3. `$XDG_CACHE_HOME/linfjax/jax` (default `~/.cache/linfjax/jax`), in a subdirectory per
     CPU (model and instruction-set flags), so that hosts of different kinds sharing a home
     directory never load each other's CPU programs.
"""

from __future__ import annotations

import hashlib
import os
import platform

import jax

OFF = "off"
ENV_VAR = "LINFJAX_COMPILE_CACHE"
# Cache every compilation, however short: JAX's default (only those over 1 s) skips most of
# linfjax's small functions, which add up. Measured on the short quick run
# (benchmarks/stage_profile.py): 15.8 s of compiling left warm with a 0.1 s floor, 8.3 s with none.
MIN_COMPILE_SECONDS = 0.0


def _cpu_tag() -> str:
  """A short name for this kind of CPU: architecture plus a hash of its model and flags."""
  model, flags = "", ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Processor") and not model:
          model = value.strip()
        elif key in ("flags", "Features") and not flags:
          flags = value.strip()
  except OSError:
    model = platform.processor()
  digest = hashlib.sha256(f"{model}|{flags}".encode()).hexdigest()[:12]
  return f"{platform.machine() or 'cpu'}-{digest}"


def default_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "linfjax", "jax", _cpu_tag())


def resolve(setting: str = "") -> str | None:
  """The cache directory that `setting` (or the environment, or the default) names; None: off."""
  chosen = setting or os.environ.get(ENV_VAR, "") or default_dir()
  if chosen.strip().lower() == OFF:
    return None
  return os.path.abspath(os.path.expanduser(chosen))


def enable(setting: str = "") -> str | None:
  """Turns the persistent cache on in `resolve(setting)`, or off; returns the directory.

  Call it before the first compilation of the process (JAX reads the setting then).
  """
  directory = resolve(setting)
  if directory is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return directory
