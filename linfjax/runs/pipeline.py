"""Runs a config's stages in order inside one work directory, skipping finished ones.

The work directory holds:
  config.json    the resolved config; a rerun with a different config is refused;
  results.json   docs/method.md's results contract; each finished stage adds its key;
  <stage>/       each stage's files and orbax checkpoints (so a killed run resumes);
  report.html    the run report (linfjax/reports/report.py), rewritten at the end of every run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Callable

import ml_collections
from absl import logging

from linfjax import attacks, data, defenses, errors, files
from linfjax import config as config_lib
from linfjax.attacks import poison
from linfjax.reports import report
from linfjax.runs import checkpoints, shared_work
from linfjax.runs import progress as progress_lib
from linfjax.runs.stages import analysis as analysis_stage
from linfjax.runs.stages import prune as prune_stage
from linfjax.runs.stages import reverse as reverse_stage
from linfjax.runs.stages import train as train_stage
from linfjax.runs.stages.context import RunContext

STAGES: dict[str, Callable[[RunContext], dict]] = {
    "train": train_stage.run,
    "reverse": reverse_stage.run,
    "analysis": analysis_stage.run,
    "prune": prune_stage.run,
}
MODEL_STAGES = ("reverse", "analysis", "prune")  # Stages that load the trained models.


class WorkdirError(errors.UserError, RuntimeError):
  """The work directory is a file, belongs to another config, or holds unreadable state."""


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WorkdirError(f"{path}: not valid JSON ({e}); the run directory is damaged: delete "
                       "that file to redo the run's stages, or use a new --workdir") from None


def _config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
  """The fields that differ, but `stages`: it says what to run now, not what the run is (a
  train-and-reverse run may later be given its analysis and prune)."""
  differences = []
  for key in sorted(set(saved) | set(current)):
    if not prefix and key == "stages":
      continue
    name = f"{prefix}{key}"
    old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
    if isinstance(old, dict) and isinstance(new, dict):
      differences += _config_differences(old, new, name + ".")
    elif old != new:
      differences.append(f"{name}: {old!r} in the workdir, {new!r} now")
  return differences


def _check_directory_path(workdir: str) -> None:
  """Raises WorkdirError when `workdir`, or the nearest of its parents that exists, is a file."""
  path = os.path.abspath(workdir)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    where = "is a file" if path == os.path.abspath(workdir) else f"lies under a file, {path}"
    raise WorkdirError(f"--workdir {workdir} {where}, not a directory; use a new directory "
                       "name (it is created)")


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises WorkdirError when `workdir` cannot hold this run: a file, or another config's run.

  Reads only; nothing is written.
  """
  _check_directory_path(workdir)
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    saved = _read_json(path)
    if not isinstance(saved, dict):
      raise WorkdirError(f"{path}: holds a {type(saved).__name__}, not a config; the run "
                         "directory is damaged: use a new --workdir")
    differences = _config_differences(saved, json.loads(config.to_json()))
    if differences:
      raise WorkdirError(
          f"{workdir} holds a run of a different config ({'; '.join(differences[:5])}). "
          "Use a new --workdir, or delete this one to start over.")
  results = os.path.join(workdir, "results.json")
  if os.path.exists(results) and not isinstance(_read_json(results), dict):
    raise WorkdirError(f"{results}: not a results object; the run directory is damaged: "
                       "delete that file to redo the run's stages, or use a new --workdir")


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Creates the work directory and its config.json, or checks that it matches.

  Call it only once the run is known to be runnable (config and data checked): a
  config.json records a run, and a later config that differs is refused, except in
  `stages`: config.json then lists every stage asked for so far, in pipeline order. If
  writing fails (a full disk, no permission), the directories this call created are removed
  again.
  """
  check_workdir(config, workdir)
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    saved = _read_json(path)
    asked = set(saved.get("stages", ())) | set(config.stages)
    stages = [stage for stage in config_lib.STAGES if stage in asked]
    if stages != list(saved.get("stages", ())):
      files.write_json(path, {**saved, "stages": stages})
    return
  created, parent = [], os.path.abspath(workdir)
  while not os.path.exists(parent):
    created.append(parent)
    parent = os.path.dirname(parent)
  try:
    os.makedirs(workdir, exist_ok=True)
    files.write_json(path, json.loads(config.to_json()))
  except OSError:
    for directory in created:  # Deepest first; only directories still empty.
      with contextlib.suppress(OSError):
        os.rmdir(directory)
    raise


def read_results(workdir: str) -> dict | None:
  """The run's results.json, or None before its first stage finishes."""
  path = os.path.join(workdir, "results.json")
  return _read_json(path) if os.path.exists(path) else None


def _as_tuples(value):
  """JSON's lists back into the tuples a config holds (config.json writes tuples as lists)."""
  if isinstance(value, list):
    return tuple(_as_tuples(v) for v in value)
  return value


def _merge(block: ml_collections.ConfigDict, values: dict) -> None:
  for key, value in values.items():
    if isinstance(value, dict) and isinstance(block.get(key), ml_collections.ConfigDict):
      _merge(block[key], value)
    else:
      block[key] = _as_tuples(value)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run directory was run with, from its config.json.

  The saved values over `config.base_config()`, tuples as tuples, so the result is the
  config the run was started with: `check_workdir` accepts it for this workdir.

  Raises:
    WorkdirError: when `workdir` holds no config.json or an unreadable one.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise WorkdirError(f"{workdir}: no config.json, so not a run directory; `python -m "
                       "linfjax.main --config=... --workdir=DIR` creates one")
  saved = _read_json(path)
  if not isinstance(saved, dict):
    raise WorkdirError(f"{path}: holds a {type(saved).__name__}, not a config; the run "
                       "directory is damaged: use a new --workdir")
  config = config_lib.base_config()
  _merge(config, saved)
  return config


def is_finished(config: ml_collections.ConfigDict, workdir: str) -> bool:
  results = read_results(workdir)
  return results is not None and all(stage in results for stage in config.stages)


def make_context(config: ml_collections.ConfigDict, workdir: str, *,
                 progress: bool | progress_lib.Tracker = True,
                 dataset: data.Dataset | None = None,
                 shared: shared_work.SharedWork | None = None) -> RunContext:
  """Loads the data (unless given), checks the config against it, and builds the trigger (or
  reads back the one an attack made on the clean model prepared in the train stage).

  Raises a UserError (ConfigError, DatasetError, TriggerError) before anything is written.
  """
  dataset = data.load(config.data) if dataset is None else dataset
  config_lib.validate_against_data(config, image_shape=dataset.image_shape,
                                   num_classes=dataset.num_classes,
                                   num_train=len(dataset.train_labels))
  split = data.split_for(dataset, config.data, config.seed)
  if "train" in config.stages:
    try:
      poison.select_poison_indices(dataset.train_labels[split.train_indices],
                                   rate=config.poison.rate, target=config.poison.target,
                                   mode=config.poison.mode, seed=config.seed)
    except ValueError as e:
      raise config_lib.ConfigError(f"config.poison.rate: {e}; change the rate or the "
                                   "data") from None
  trigger = train_stage.read_prepared_trigger(
      workdir, attacks.from_config(config.trigger, dataset.image_shape))
  return RunContext(config=config, workdir=workdir, dataset=dataset, split=split,
                    trigger=trigger, progress=progress, shared=shared)


def estimate_work(config: ml_collections.ConfigDict, dataset: data.Dataset) -> dict[str, float]:
  """Each stage's work in image passes (a backward pass counts 2), for the progress estimate.

  Rough by design: the model's cost per image is taken as the same in every stage, and the
  pruning sweep's heads (the layers after L, for every mask) and the figures are left out;
  each defense estimates its own (`Defense.cost`).
  """
  clean_set = data.clean_set_size(config.data, len(dataset.train_labels))
  held_out = 0 if config.data.clean_set_from == "training" else clean_set
  num_train, test = len(dataset.train_labels) - held_out, len(dataset.test_labels)
  models = len(train_stage.MODEL_KINDS)  # backdoored and vanilla
  train_steps = train_stage.training_epochs(config) * (num_train // config.train.batch_size)
  reverse = config.reverse
  per_step = (reverse.mini_batches * reverse.batch_size * 3.0
              + min(reverse.success_images, clean_set))
  work = defenses.Work(clean_set=clean_set, test=test, num_classes=dataset.num_classes)
  prune = sum(defenses.DEFENSES[name].cost(work) for source in prune_stage.SOURCES
              for name in prune_stage.defense_names(config, source))
  return {
      "train": train_steps * config.train.batch_size * 3.0,
      "reverse": models * reverse.steps * per_step * dataset.num_classes,
      "analysis": models * 3 * (clean_set + 3 * analysis_stage.ATTENTION_IMAGES),
      "prune": prune,
  }


def plan_work(tracker: progress_lib.Tracker, config: ml_collections.ConfigDict, workdir: str,
              dataset: data.Dataset) -> None:
  """Adds the run's unfinished stages' estimated work to `tracker` (once per workdir)."""
  results = read_results(workdir) or {}
  work = estimate_work(config, dataset)
  tracker.plan(workdir, {stage: work[stage] for stage in config.stages if stage not in results})


def check_trained_models(ctx: RunContext, pending: list[str]) -> None:
  """Restores the finished train stage's models when a pending stage needs them.

  Runs before anything is written, so a missing, truncated or foreign checkpoint is a
  CheckpointError that leaves the workdir as it was.
  """
  if "train" in pending or not set(pending) & set(MODEL_STAGES):
    return
  prepared = train_stage.prepared_path(ctx.workdir)
  if attacks.needs_clean_model(ctx.config.trigger) and not os.path.exists(prepared):
    raise checkpoints.CheckpointError(
        f"{prepared}: missing; the {ctx.config.trigger.kind} attack was made on the vanilla "
        f"model in the train stage and saved there. Delete {os.path.join(ctx.workdir, 'train')} "
        f"and {os.path.join(ctx.workdir, 'results.json')} to train again, then rerun")
  for kind in train_stage.MODEL_KINDS:
    directory = train_stage.checkpoint_dir(ctx.workdir, kind)
    try:
      if not os.path.isdir(directory):
        raise checkpoints.CheckpointError(f"{directory}: no checkpoint folder")
      train_stage.load_trained(ctx, kind)
    except checkpoints.CheckpointError as e:
      reason = errors.one_line(e).removeprefix(directory + ": ")
      reason = reason if len(reason) <= 160 else reason[:157] + "..."
      raise checkpoints.CheckpointError(
          f"{directory}: the trained {kind} model cannot be restored; it is missing, "
          f"truncated or from another model ({reason}). results.json records the train stage "
          f"as finished: delete {os.path.join(ctx.workdir, 'train')} and "
          f"{os.path.join(ctx.workdir, 'results.json')} to train again, then rerun") from None


def run(config: ml_collections.ConfigDict, workdir: str, *,
        progress: bool | progress_lib.Tracker = True,
        dataset: data.Dataset | None = None,
        shared: shared_work.SharedWork | None = None) -> dict:
  """Validates the config, then runs every unfinished stage; returns results.json's content.

  Nothing is written until the config, the workdir, the data and the checkpoints that the
  pending stages need have been checked, so a run that fails on a mistake leaves the
  workdir as it was. A workdir this call created is removed again when a user error
  (say, a diverging loss) ends the run before its first stage finished, so the fixed
  command can rerun into it. `dataset`, when given, is `config.data` already loaded (a
  grid loads it once). `progress` is a flag, or the grid's Tracker (linfjax/runs/progress.py)
  this run's stages report to. `shared`, a grid's shared pieces, which stages read or
  compute once for all its runs.
  """
  config_lib.validate(config)
  check_workdir(config, workdir)
  results = read_results(workdir) or {"seed": config.seed}
  pending = [stage for stage in config.stages if stage not in results]
  for stage in config.stages:
    if stage not in pending:
      logging.info("stage %s: finished earlier, skipped", stage)
  if not pending:
    logging.info("report: writing %s", os.path.join(workdir, report.REPORT_FILE))
    report.write_report(workdir)
    return results
  ctx = make_context(config, workdir, progress=progress, dataset=dataset, shared=shared)
  check_trained_models(ctx, pending)
  fresh = not os.path.exists(workdir)
  prepare_workdir(config, workdir)
  tracker = ctx.progress
  results_path = os.path.join(workdir, "results.json")
  try:
    plan_work(tracker, config, workdir, ctx.dataset)
    for stage in pending:
      logging.info("stage %s: running", stage)
      with tracker.stage(workdir, stage):
        results[stage] = STAGES[stage](ctx)
      files.write_json(results_path, results)
  except errors.UserError:
    if fresh and not os.path.exists(results_path):
      shutil.rmtree(workdir, ignore_errors=True)
    raise
  finally:
    if not isinstance(progress, progress_lib.Tracker):
      tracker.close()
  logging.info("report: writing %s", os.path.join(workdir, report.REPORT_FILE))
  report.write_report(workdir)
  return results
