"""Runs a grid of runs (linfjax/runs/grid.py) in one process: data loaded once, compiled once.

The grid directory holds:
  grid.json            the axes and the runs (names and values), rewritten on every start;
  runs/<name>/         one complete single-run directory per run (linfjax/runs/pipeline.py), so
                       every single-run tool and report works on it;
  shared/              work that several runs need, done once (linfjax/runs/shared_work.py): the
                       vanilla models, keyed by seed, data, model and recipe;
  runs/<name>/error.json  the error of a run's last failed attempt (removed on success);
  grid.csv, aggregates.csv, figures/, grid_report.html   the grid report (grid_report.py).

Every run config is expanded and validated, each distinct dataset loaded once, and every
run checked against its data and its directory before any compute. The runs then go
one after another through `pipeline.run`; the jitted functions are cached by shape and
settings (models and optimizers are shared objects), so a run of the same shapes as an
earlier one compiles nothing. With several devices (or `sweep.models_per_device` > 1),
the pending runs' models are first trained in lockstep over a device mesh
(linfjax/runs/lockstep.py) and the runs then find them trained (their train/metrics.json then
has no per-epoch log: the grid's log has it). A failed run is recorded and
the others go on; a rerun does only the unfinished runs. `shard=(i, n)` keeps runs
i, i+n, ...: several processes or hosts share a grid, each writing only its own runs (and
the shared pieces it is the first to need; the others wait for those, or read them).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback

import jax
import ml_collections
import tqdm
from absl import logging

from linfjax import config as config_lib
from linfjax import attacks, data, files
from linfjax.runs import grid, lockstep, pipeline, shared_work
from linfjax.reports import grid_report
from linfjax.training import train
from linfjax.runs import progress as progress_lib
from linfjax.runs.stages import train as train_stage


def run_dir(workdir: str, run: grid.Run) -> str:
  return os.path.join(workdir, "runs", run.name)


def shared_dir(workdir: str) -> str:
  return os.path.join(workdir, "shared")


def error_path(workdir: str, run: grid.Run) -> str:
  return os.path.join(run_dir(workdir, run), "error.json")


def _load_datasets(runs: list[grid.Run]) -> dict[str, data.Dataset]:
  """Each distinct data block loaded once, keyed by its JSON."""
  datasets = {}
  for run in runs:
    key = run.config.data.to_json()
    if key not in datasets:
      datasets[key] = data.load(run.config.data)
  return datasets


def _dataset(datasets: dict[str, data.Dataset], run: grid.Run) -> data.Dataset:
  return datasets[run.config.data.to_json()]


def _check_runs(workdir: str, runs: list[grid.Run], datasets: dict[str, data.Dataset]) -> None:
  """Every run against its data and its directory, before any compute."""
  for run in runs:
    dataset = _dataset(datasets, run)
    try:
      config_lib.validate_against_data(run.config, image_shape=dataset.image_shape,
                                       num_classes=dataset.num_classes,
                                       num_train=len(dataset.train_labels))
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"grid run {run.name}: {e}") from None
    pipeline.check_workdir(run.config, run_dir(workdir, run))


def _train_signature(config: ml_collections.ConfigDict) -> str:
  """Runs whose models can train in lockstep: same data, model and recipe, and a trigger of
  the same kind (triggers of different kinds are different pytrees, which do not stack)."""
  return json.dumps([json.loads(config[block].to_json()) for block in ("data", "model", "train")]
                    + [config.trigger.kind])


def _lockstep_train(workdir: str, runs: list[grid.Run], datasets,
                    shared: shared_work.SharedWork | None, *, per_device: int,
                    progress: bool) -> None:
  """Trains the unfinished models of `runs` together, group by group, into their stores.

  Models group by training signature and epochs already done; a group holds one model
  per device times `per_device`, and only its own data is on the devices. A group that
  fails is logged and left to the runs themselves, which then record their errors.
  """
  mesh = lockstep.make_mesh()
  group_size = mesh.devices.size * per_device
  groups: dict[tuple, list] = {}
  seen_pieces = set()
  for run in runs:
    if "train" not in run.config.stages:
      continue
    for kind in train_stage.MODEL_KINDS:
      if kind == "backdoored" and attacks.needs_clean_model(run.config.trigger):
        continue  # Its trigger is made on its vanilla model: its own train stage trains it.
      piece = None
      if kind == "vanilla" and shared is not None:  # Each distinct vanilla model once.
        piece = shared.piece(train_stage.VANILLA_PIECE,
                             train_stage.vanilla_dependencies(run.config))
        if piece.done or piece.key in seen_pieces:
          continue
        seen_pieces.add(piece.key)
        done = train_stage.epochs_done(train_stage.shared_checkpoint_dir(piece))
      else:
        done = train_stage.epochs_done(train_stage.checkpoint_dir(run_dir(workdir, run), kind))
      if done < run.config.train.epochs:
        groups.setdefault((_train_signature(run.config), done), []).append((run, kind, piece))
  for members in groups.values():
    for first in range(0, len(members), group_size):
      chunk = members[first:first + group_size]
      try:
        _train_group(workdir, chunk, datasets, mesh, progress=progress)
      except Exception:  # The runs retry on their own and record what fails.
        logging.exception("grid: lockstep training of %s failed; the runs will train alone",
                          ", ".join(f"{run.name}/{kind}" for run, kind, _ in chunk))


def _train_group(workdir: str, members: list, datasets, mesh, *, progress: bool) -> None:
  """Trains `members` ((run, kind, shared piece or None)) in lockstep; shared pieces that
  another process holds or finished are left out (the runs read them later)."""
  with contextlib.ExitStack() as claims:
    members = [(run, kind, piece) for run, kind, piece in members
               if piece is None or (claims.enter_context(piece.claim(wait=False))
                                    and not piece.done)]
    if members:
      _train_claimed(workdir, members, datasets, mesh, progress=progress)


def _train_claimed(workdir: str, members: list, datasets, mesh, *, progress: bool) -> None:
  plans, contexts = [], {}
  epoch_logs = [[] for _ in members]
  for run, kind, piece in members:
    if run.name not in contexts:
      ctx = pipeline.make_context(run.config, run_dir(workdir, run), progress=False,
                                  dataset=_dataset(datasets, run))
      pipeline.prepare_workdir(run.config, run_dir(workdir, run))
      contexts[run.name] = (ctx, train_stage.training_sets(ctx))
    ctx, sets = contexts[run.name]
    directory = None if piece is None else train_stage.shared_checkpoint_dir(piece)
    plans.append(train_stage.plan(ctx, kind, sets[kind], directory=directory))
  recipe = train.Recipe.from_config(members[0][0].config.train)
  start_epoch = plans[0].start_epoch
  steps = train.steps_per_epoch(plans[0].data.labels.shape[0], recipe.batch_size)
  logging.info("grid: training %d models in lockstep over %d devices: %s", len(members),
               mesh.devices.size, ", ".join(f"{run.name}/{kind}" for run, kind, _ in members))
  bar = tqdm.tqdm(total=(recipe.epochs - start_epoch) * steps, unit="step",
                  desc=f"lockstep x{len(members)}", disable=not progress, leave=False)

  def on_epoch_end(epoch, states, epoch_metrics):
    for model_plan, state, log, metrics in zip(plans, states, epoch_logs, epoch_metrics):
      model_plan.store.save(epoch + 1, state)
      log.append({"epoch": epoch + 1, **metrics})
    logging.info("grid: lockstep epoch %d/%d, mean loss %.4f", epoch + 1, recipe.epochs,
                 sum(m["loss"] for m in epoch_metrics) / len(epoch_metrics))

  try:
    lockstep.fit([p.state for p in plans], [p.data for p in plans], [p.trigger for p in plans],
                 [p.key for p in plans], recipe, mesh=mesh, start_epoch=start_epoch,
                 on_epoch_end=on_epoch_end, on_step=lambda: bar.update(1))
  finally:
    bar.close()
    for model_plan in plans:
      model_plan.store.close()
  for (_, _, piece), log in zip(members, epoch_logs):
    if piece is not None:
      piece.mark_done({"epochs": log, "lockstep": True})


def _record_failure(workdir: str, run: grid.Run, error: Exception) -> None:
  os.makedirs(run_dir(workdir, run), exist_ok=True)
  files.write_json(error_path(workdir, run), {
      "error": type(error).__name__, "message": str(error),
      "traceback": traceback.format_exc(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def failure_message(statuses: dict[str, str], workdir: str) -> str | None:
  """What a grid process says on exit when some of its runs failed; None when none did."""
  failed = [name for name, status in statuses.items() if status == "failed"]
  if not failed:
    return None
  shown = ", ".join(failed[:5]) + (", ..." if len(failed) > 5 else "")
  return (f"grid: {len(failed)} of {len(statuses)} runs of this process failed ({shown}); "
          f"each has its error in {os.path.join(workdir, 'runs', '<name>', 'error.json')}, "
          "and rerunning the same command retries them")


def run(config: ml_collections.ConfigDict, workdir: str, *, shard: tuple[int, int] = (0, 1),
        progress: bool = True) -> dict:
  """Runs this shard's unfinished runs of the grid; returns {run name: status}.

  Raises:
    config_lib.ConfigError: a bad axis or run config (before any compute).
    pipeline.WorkdirError: a run directory holds a different config (before any compute).
  """
  config_lib.validate(config)
  axes = grid.parse_axes(config)
  runs = grid.expand(config)
  shard_index, shard_count = shard
  mine = runs[shard_index::shard_count]
  datasets = _load_datasets(mine)
  _check_runs(workdir, mine, datasets)
  os.makedirs(workdir, exist_ok=True)
  files.write_json(os.path.join(workdir, "grid.json"), grid.describe(axes, runs))
  pending = [r for r in mine if not pipeline.is_finished(r.config, run_dir(workdir, r))]
  logging.info("grid: %d runs, %d in shard %d/%d, %d unfinished", len(runs), len(mine),
               shard_index, shard_count, len(pending))
  per_device = config.sweep.models_per_device
  shared = shared_work.SharedWork(shared_dir(workdir)) if config.sweep.share else None
  if pending and (len(jax.local_devices()) > 1 or per_device > 1):
    _lockstep_train(workdir, pending, datasets, shared, per_device=per_device,
                    progress=progress)
  pending_names = {r.name for r in pending}
  statuses = {r.name: "finished" for r in mine if r.name not in pending_names}
  started = time.perf_counter()
  tracker = progress_lib.Tracker(enabled=progress, desc="grid")
  for run_item in pending:
    pipeline.plan_work(tracker, run_item.config, run_dir(workdir, run_item),
                       _dataset(datasets, run_item))
  for done, run_item in enumerate(pending):
    logging.info("grid: running %s (%d of %d unfinished)", run_item.name, done + 1, len(pending))
    try:
      pipeline.run(run_item.config, run_dir(workdir, run_item), progress=tracker,
                   dataset=_dataset(datasets, run_item), shared=shared)
    except Exception as error:  # One run's failure must not stop the grid.
      logging.exception("grid: run %s failed", run_item.name)
      _record_failure(workdir, run_item, error)
      tracker.abandon(run_dir(workdir, run_item))
      statuses[run_item.name] = "failed"
    else:
      if os.path.exists(error_path(workdir, run_item)):
        os.remove(error_path(workdir, run_item))
      statuses[run_item.name] = "finished"
    elapsed = time.perf_counter() - started
    left = len(pending) - done - 1
    failed = sum(status == "failed" for status in statuses.values())
    logging.info("grid: %d finished, %d failed, %d left in this shard; about %.1f min left",
                 len(statuses) - failed, failed, left, elapsed / (done + 1) * left / 60)
  tracker.close()
  grid_report.write_grid_report(workdir)
  return statuses
