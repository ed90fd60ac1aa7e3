"""A grid's runs read back from their directories, and their numbers aggregated over seeds.

`read_grid` lists the grid's runs (GRID/grid.json: the axes and each run's values), `read_run`
reads one run's status and numbers (finished: results.json has every stage; failed: an
error.json; else incomplete), and `aggregate` groups runs by the non-seed axes into mean,
sample sd and 95 % CI (Student's t) per number, and value counts of categorical ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import numpy as np
import scipy.stats
from absl import logging

from linfjax import errors
from linfjax.reports import results as results_lib

GRID_FILE = "grid.json"
ERROR_FILE = "error.json"
STATUSES = ("finished", "failed", "incomplete")
STATS = ("n", "mean", "sd", "ci95")


class GridReportError(errors.UserError, ValueError):
  """grid.json is missing or does not describe a grid."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of the grid as its directory shows it."""
  name: str
  values: dict[str, Any]  # axis field -> this run's value
  status: str  # one of STATUSES
  numbers: dict[str, Any]  # dotted results.json path -> number, or None for null
  error: str = ""  # failed runs: the exception's type, or what could not be read
  message: str = ""
  traceback: str = ""


@dataclasses.dataclass(frozen=True)
class Aggregate:
  """One combination of the non-seed axes and its finished runs' statistics."""
  values: dict[str, Any]  # non-seed axis field -> value
  runs: int
  finished: int
  stats: dict[str, dict[str, Any]]  # result column -> mean_ci(...)
  counts: dict[str, str] = dataclasses.field(default_factory=dict)  # label column -> counts


def read_grid(grid_dir: str) -> tuple[list[tuple[str, list]], list[tuple[str, dict]]]:
  """grid.json's axes as (field, values) and runs as (name, values), checked."""
  path = os.path.join(grid_dir, GRID_FILE)
  if not os.path.isfile(path):
    raise GridReportError(f"{path}: not found; is {grid_dir} a grid directory?")
  try:
    with open(path) as f:
      grid = json.load(f)
  except (OSError, ValueError) as e:
    raise GridReportError(f"{path}: not valid JSON ({e})") from None
  if not (isinstance(grid, dict) and isinstance(grid.get("axes"), list)
          and isinstance(grid.get("runs"), list)):
    raise GridReportError(f'{path}: expected an object {{"axes": [...], "runs": [...]}}')
  axes = []
  for i, axis in enumerate(grid["axes"]):
    if not (isinstance(axis, dict) and isinstance(axis.get("field"), str)
            and isinstance(axis.get("values"), list)):
      raise GridReportError(f'{path}: axes[{i}] should be {{"field": str, "values": list}}, '
                            f"found {axis!r}")
    if axis["field"] in ("name", "status") or axis["field"] in dict(axes):
      raise GridReportError(f"{path}: axis field {axis['field']!r} is repeated or reserved")
    axes.append((axis["field"], axis["values"]))
  if not grid["runs"]:
    raise GridReportError(f"{path}: lists no runs")
  runs, fields = [], {field for field, _ in axes}
  for i, run in enumerate(grid["runs"]):
    name = run.get("name") if isinstance(run, dict) else None
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or os.sep in name:
      raise GridReportError(f"{path}: runs[{i}] needs a 'name' that is a directory name "
                            f"under runs/, found {name!r}")
    if name in dict(runs):
      raise GridReportError(f"{path}: run name {name!r} appears twice")
    values = run.get("values")
    if not isinstance(values, dict) or set(values) != fields:
      raise GridReportError(f"{path}: run {name!r} should give one value per axis "
                            f"({', '.join(sorted(fields))}), found {values!r}")
    runs.append((name, values))
  return axes, runs


def _read_object(path: str) -> dict | None:
  """The JSON object in `path`, None if absent; ValueError saying what is wrong otherwise."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{os.path.basename(path)} is not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise ValueError(f"{os.path.basename(path)} holds a {type(value).__name__}, not an object")
  return value


def read_run(grid_dir: str, name: str, values: dict[str, Any]) -> Run:
  """The run `runs/<name>` with its status, its numbers and, if it failed, why."""
  run_dir = os.path.join(grid_dir, "runs", name)
  contents, problems = {}, []
  for file in ("config.json", "results.json", ERROR_FILE):
    try:
      contents[file] = _read_object(os.path.join(run_dir, file))
    except ValueError as e:
      contents[file] = None
      problems.append(str(e))
  config, results, error = (contents[f] for f in ("config.json", "results.json", ERROR_FILE))
  numbers = results_lib.flatten(results) if results else {}
  if error is not None:
    return Run(name, values, "failed", numbers, str(error.get("error", "")),
               str(error.get("message", "")), str(error.get("traceback", "")))
  stages = config.get("stages") if config is not None else []
  if not (isinstance(stages, list) and all(isinstance(s, str) for s in stages)):
    problems.append(f"config.json: 'stages' should be a list of stage names, found {stages!r}")
  if problems:
    logging.warning("run %s: %s", name, "; ".join(problems))
    return Run(name, values, "failed", numbers, "unreadable run files", "; ".join(problems))
  finished = (config is not None and results is not None
              and all(stage in results for stage in stages))
  return Run(name, values, "finished" if finished else "incomplete", numbers)


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
  """n, mean, sample sd (ddof 1) and the 95 % CI half-width of the mean.

  The half-width is `t_{0.975, n-1} * sd / sqrt(n)` (Student's t); sd and ci95 are None
  for fewer than two values, the mean for none.
  """
  n = len(values)
  sd = float(np.std(values, ddof=1)) if n > 1 else None
  ci95 = float(scipy.stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n) if n > 1 else None
  return {"n": n, "mean": float(np.mean(values)) if n else None, "sd": sd, "ci95": ci95}


def _value_counts(values: Sequence[Any]) -> str:
  """'0: 2, null: 1' for a label column's values (None is null)."""
  counts: dict[str, int] = {}
  for value in values:
    key = "null" if value is None else f"{value:g}"
    counts[key] = counts.get(key, 0) + 1
  return ", ".join(f"{key}: {n}" for key, n in counts.items())


def aggregate(runs: Sequence[Run], fields: Sequence[str], columns: Sequence[str],
              labels: Sequence[str] = ()) -> list[Aggregate]:
  """Per combination of `fields` (in order of first appearance), its finished runs' stats
  over `columns` and value counts of the `labels` columns."""
  groups: dict[tuple, list[Run]] = {}
  for run in runs:
    groups.setdefault(json.dumps([run.values[f] for f in fields]), []).append(run)
  rows = []
  for members in groups.values():
    finished = [run for run in members if run.status == "finished"]
    stats = {c: mean_ci([run.numbers[c] for run in finished if run.numbers.get(c) is not None])
             for c in columns}
    counts = {c: _value_counts([run.numbers[c] for run in finished if c in run.numbers])
              for c in labels}
    rows.append(Aggregate({f: members[0].values[f] for f in fields}, len(members),
                          len(finished), stats, counts))
  return rows
