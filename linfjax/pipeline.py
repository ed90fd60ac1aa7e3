"""Runs a config's stages in order inside one work directory, skipping finished ones.

The work directory holds:
  config.json    the resolved config; a rerun with a different config is refused;
  results.json   METHOD.md's results contract; each finished stage adds its key;
  <stage>/       each stage's files and orbax checkpoints (so a killed run resumes);
  report.html    the run report (linfjax/report.py), rewritten at the end of every run.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import ml_collections
from absl import logging

from linfjax import config as config_lib
from linfjax import data, files, report, shared_work, triggers
from linfjax.stages import analysis as analysis_stage
from linfjax.stages import prune as prune_stage
from linfjax.stages import reverse as reverse_stage
from linfjax.stages import train as train_stage
from linfjax.stages.context import RunContext

STAGES: dict[str, Callable[[RunContext], dict]] = {
    "train": train_stage.run,
    "reverse": reverse_stage.run,
    "analysis": analysis_stage.run,
    "prune": prune_stage.run,
}


class WorkdirError(RuntimeError):
  """The work directory belongs to another config or holds unreadable state."""


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise WorkdirError(f"{path}: not valid JSON ({e}); the run directory is damaged") from None


def _config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
  differences = []
  for key in sorted(set(saved) | set(current)):
    name = f"{prefix}{key}"
    old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
    if isinstance(old, dict) and isinstance(new, dict):
      differences += _config_differences(old, new, name + ".")
    elif old != new:
      differences.append(f"{name}: {old!r} in the workdir, {new!r} now")
  return differences


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises WorkdirError when `workdir` holds a run of a different config."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    differences = _config_differences(_read_json(path), json.loads(config.to_json()))
    if differences:
      raise WorkdirError(
          f"{workdir} holds a run of a different config ({'; '.join(differences[:5])}). "
          "Use a new --workdir, or delete this one to start over.")


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Creates the work directory and its config.json, or checks that it matches."""
  check_workdir(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    files.write_json(path, json.loads(config.to_json()))


def read_results(workdir: str) -> dict | None:
  """The run's results.json, or None before its first stage finishes."""
  path = os.path.join(workdir, "results.json")
  return _read_json(path) if os.path.exists(path) else None


def is_finished(config: ml_collections.ConfigDict, workdir: str) -> bool:
  results = read_results(workdir)
  return results is not None and all(stage in results for stage in config.stages)


def make_context(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
                 dataset: data.Dataset | None = None,
                 shared: shared_work.SharedWork | None = None) -> RunContext:
  """Loads the data (unless given), checks the config against it, and builds the trigger."""
  dataset = data.load(config.data) if dataset is None else dataset
  config_lib.validate_against_data(config, image_shape=dataset.image_shape,
                                   num_classes=dataset.num_classes,
                                   num_train=len(dataset.train_labels))
  split = data.hold_out_clean_set(len(dataset.train_labels), config.data.clean_set_size,
                                  config.seed)
  trigger = triggers.from_config(config.trigger, dataset.image_shape)
  return RunContext(config=config, workdir=workdir, dataset=dataset, split=split,
                    trigger=trigger, progress=progress, shared=shared)


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
        dataset: data.Dataset | None = None,
        shared: shared_work.SharedWork | None = None) -> dict:
  """Validates the config, then runs every unfinished stage; returns results.json's content.

  `dataset`, when given, is `config.data` already loaded (a grid loads it once); `shared`,
  a grid's shared pieces, which stages read or compute once for all its runs.
  """
  config_lib.validate(config)
  prepare_workdir(config, workdir)
  results_path = os.path.join(workdir, "results.json")
  results = read_results(workdir) or {"seed": config.seed}
  pending = [stage for stage in config.stages if stage not in results]
  for stage in config.stages:
    if stage not in pending:
      logging.info("stage %s: finished earlier, skipped", stage)
  if not pending:
    report.write_report(workdir)
    return results
  ctx = make_context(config, workdir, progress=progress, dataset=dataset, shared=shared)
  for stage in pending:
    logging.info("stage %s: running", stage)
    results[stage] = STAGES[stage](ctx)
    files.write_json(results_path, results)
  report.write_report(workdir)
  return results
