"""The `train` stage: a backdoored and a vanilla model, same recipe and seed, resumable.

Writes under `WORKDIR/train/`:
  split.npz            the defender's clean set S, the training indices, and the
                       poisoned and noise-mode (WaNet) indices (positions in the
                       training images);
  backdoored/, vanilla/  orbax checkpoints, one per finished epoch;
  metrics.json         per-epoch loss/accuracy, seconds per model, final CA/ASR/RA.
Returns the `train` entry of results.json (docs/method.md, "Results file").

In a grid (`ctx.shared` set), the vanilla model is a shared piece (linfjax/runs/shared_work.py)
keyed by `vanilla_dependencies`: the first run that needs it trains it into the grid's
`shared/vanilla_model/<key>/checkpoints/`, every run copies the final checkpoint into its
own `train/vanilla/` (so its directory stays a complete single run), and its CA/ASR/RA are
evaluated per run (the ASR depends on the run's trigger and target).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
from absl import logging

from linfjax.runs import checkpoints
from linfjax import files, keys
from linfjax.training import metrics, train
from linfjax import models
from linfjax import attacks
from linfjax.attacks import poison
from linfjax.runs.stages.context import RunContext

MODEL_KINDS = ("backdoored", "vanilla")
VANILLA_PIECE = "vanilla_model"


def vanilla_dependencies(config) -> dict:
  """The config values that the vanilla model depends on, and no others.

  The seed (initialisation, shuffles, augmentation, and the clean set S held out of
  training), the data block, the model block and the training recipe; not the trigger,
  the poisoning, Neural Cleanse or pruning, nor the evaluation batch size.
  """
  recipe = json.loads(config.train.to_json())
  recipe.pop("eval_batch_size", None)
  return {"seed": config.seed, "data": json.loads(config.data.to_json()),
          "model": json.loads(config.model.to_json()), "train": recipe}


def vanilla_piece(ctx: RunContext):
  """The grid's shared vanilla model for this run (`ctx.shared` must be set)."""
  return ctx.shared.piece(VANILLA_PIECE, vanilla_dependencies(ctx.config))


def shared_checkpoint_dir(piece) -> str:
  return piece.path("checkpoints")


def training_sets(ctx: RunContext) -> dict[str, poison.PoisonedSet]:
  """The backdoored model's poisoned training set and the vanilla model's clean one."""
  cfg = ctx.config
  return {
      "backdoored": poison.from_config(
          ctx.train_images, ctx.train_labels, ctx.trigger, poison_block=cfg.poison,
          trigger_block=cfg.trigger, num_classes=ctx.dataset.num_classes, seed=cfg.seed),
      "vanilla": poison.clean(ctx.train_images, ctx.train_labels),
  }


def _initial_state(ctx: RunContext, num_examples: int):
  model = ctx.model()
  return model, train.initial_state(model, ctx.config.train, image_shape=ctx.dataset.image_shape,
                                    num_examples=num_examples, seed=ctx.config.seed)


def checkpoint_dir(workdir: str, kind: str) -> str:
  return os.path.join(workdir, "train", kind)


def epochs_done(directory: str) -> int:
  """Epochs of the model checkpointed in `directory` (0 before the first)."""
  store = checkpoints.StageCheckpoints(directory)
  done = store.latest_step() or 0
  store.close()
  return done


def load_trained(ctx: RunContext, kind: str):
  """The finished `kind` model ('backdoored' or 'vanilla') and its variables."""
  model, state = _initial_state(ctx, len(ctx.split.train_indices))
  store = checkpoints.StageCheckpoints(checkpoint_dir(ctx.workdir, kind))
  if store.latest_step() != ctx.config.train.epochs:
    raise checkpoints.CheckpointError(
        f"{store.directory}: the {kind} model has not finished training "
        f"(latest epoch {store.latest_step()} of {ctx.config.train.epochs})")
  state = store.restore(state)
  store.close()
  return model, train.variables(state)


@dataclasses.dataclass
class ModelPlan:
  """Everything needed to train (or resume) one of a run's models.

  `state` is restored from the latest checkpoint in `store`, if any, and `start_epoch`
  counts the epochs already done. The grid's lockstep trainer (linfjax/runs/sweep.py) trains
  the plans of several runs together and saves into the same stores, so this stage
  then finds those models finished.
  """
  kind: str
  model: models.LayeredClassifier
  state: train.TrainState
  data: train.DeviceData
  trigger: attacks.Trigger
  key: jax.Array
  store: checkpoints.StageCheckpoints
  start_epoch: int


def plan(ctx: RunContext, kind: str, training_set: poison.PoisonedSet, *,
         directory: str | None = None) -> ModelPlan:
  """The plan of the `kind` model, checkpointed in `directory` (default: the run's own)."""
  model, state = _initial_state(ctx, len(training_set.labels))
  store = checkpoints.StageCheckpoints(directory or checkpoint_dir(ctx.workdir, kind))
  start_epoch = store.latest_step() or 0
  if start_epoch:
    state = store.restore(state)
  key = keys.run_key(ctx.config.seed, keys.TRAIN_STEPS)
  return ModelPlan(kind, model, state, train.to_device(training_set), ctx.trigger, key, store,
                   start_epoch)


def _train_model(ctx: RunContext, kind: str, training_set: poison.PoisonedSet, log: dict, *,
                 directory: str | None = None):
  cfg = ctx.config.train
  model_plan = plan(ctx, kind, training_set, directory=directory)
  store, start_epoch = model_plan.store, model_plan.start_epoch
  if start_epoch:
    logging.info("train/%s: resuming after epoch %d of %d", kind, start_epoch, cfg.epochs)
  steps = train.steps_per_epoch(len(training_set.labels), cfg.batch_size)
  bar = ctx.progress.bar(f"train {kind}", cfg.epochs * steps, part=1 / len(MODEL_KINDS),
                         initial=start_epoch * steps)
  epoch_log = log.setdefault("epochs", [])
  started = time.perf_counter()

  def on_epoch_end(epoch, state, epoch_metrics):
    store.save(epoch + 1, state)
    epoch_log.append({"epoch": epoch + 1, **epoch_metrics})
    bar.set_postfix(loss=f"{epoch_metrics['loss']:.3f}", acc=f"{epoch_metrics['accuracy']:.3f}")
    logging.info("train/%s: epoch %d/%d loss %.4f accuracy %.4f", kind, epoch + 1, cfg.epochs,
                 epoch_metrics["loss"], epoch_metrics["accuracy"])

  state = train.fit(model_plan.state, model_plan.data, ctx.trigger, train.Recipe.from_config(cfg),
                    key=model_plan.key, start_epoch=start_epoch, on_epoch_end=on_epoch_end,
                    on_step=lambda step_metrics: bar.update(result=step_metrics))
  bar.close()
  store.close()
  log["seconds"] = time.perf_counter() - started
  return model_plan.model, train.variables(state)


def _shared_vanilla(ctx: RunContext, training_set: poison.PoisonedSet, log: dict):
  """The grid's vanilla model for this run: trained here unless another run did, then its
  final checkpoint copied into this run's `train/vanilla/`."""
  piece = vanilla_piece(ctx)

  def train_vanilla() -> dict:
    piece_log = {}
    _train_model(ctx, "vanilla", training_set, piece_log, directory=shared_checkpoint_dir(piece))
    return piece_log

  computed_here = piece.compute_once(train_vanilla)
  log.update(piece.summary(), shared=piece.directory, trained_by_this_run=computed_here)
  if not computed_here:
    logging.info("train/vanilla: shared with earlier runs of the grid (%s)", piece.directory)
  shared_store = checkpoints.StageCheckpoints(shared_checkpoint_dir(piece))
  own_store = checkpoints.StageCheckpoints(checkpoint_dir(ctx.workdir, "vanilla"))
  shared_store.copy_latest_to(own_store)
  shared_store.close()
  own_store.close()
  return load_trained(ctx, "vanilla")


def run(ctx: RunContext) -> dict:
  cfg = ctx.config
  stage_dir = ctx.stage_dir("train")
  sets = training_sets(ctx)
  files.write_npz(os.path.join(stage_dir, "split.npz"),
                  clean_set_indices=ctx.split.clean_set_indices,
                  train_indices=ctx.split.train_indices,
                  poison_indices=sets["backdoored"].poison_indices,
                  noise_indices=sets["backdoored"].noise_indices)
  result, log = {}, {}
  for kind in MODEL_KINDS:
    log[kind] = {}
    if kind == "vanilla" and ctx.shared is not None:
      model, variables = _shared_vanilla(ctx, sets[kind], log[kind])
    else:
      model, variables = _train_model(ctx, kind, sets[kind], log[kind])
    result[kind] = metrics.evaluate(
        model.apply, variables, ctx.dataset.test_images, ctx.dataset.test_labels, ctx.trigger,
        target=cfg.poison.target, mode=cfg.poison.mode, num_classes=ctx.dataset.num_classes,
        batch_size=cfg.train.eval_batch_size)
    log[kind]["test"] = result[kind]
    logging.info("train/%s: CA %.2f ASR %.2f RA %.2f", kind, result[kind]["CA"],
                 result[kind]["ASR"], result[kind]["RA"])
  result["poisoned"] = int(len(sets["backdoored"].poison_indices))
  result["clean_set"] = int(len(ctx.split.clean_set_indices))
  files.write_json(os.path.join(stage_dir, "metrics.json"), log)
  return result
