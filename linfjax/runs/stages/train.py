"""The `train` stage: a backdoored and a vanilla model, same recipe and seed, resumable.

Writes under `WORKDIR/train/`:
  split.npz            the defender's clean set S, the training indices, and the
                       poisoned and noise-mode (WaNet) indices (positions in the
                       training images);
  backdoored/, vanilla/  orbax checkpoints, one per finished epoch;
  prepared_attack.npz  for an attack made on a clean model (attacks/base.py, `prepare`):
                       its trigger's arrays and the poisoned examples' perturbed images,
                       made on this run's vanilla model, which then trains first;
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
import jax.numpy as jnp
import numpy as np
from absl import logging

from linfjax.runs import checkpoints
from linfjax import files, keys
from linfjax.training import abl, metrics, train
from linfjax import models
from linfjax import attacks
from linfjax.attacks import poison
from linfjax.runs.stages.context import RunContext

MODEL_KINDS = ("backdoored", "vanilla")
PREPARED_FILE = "prepared_attack.npz"
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


def backdoored_set(ctx: RunContext, images: np.ndarray) -> poison.PoisonedSet:
  """The backdoored model's training set: `images` (the run's training images) poisoned."""
  cfg = ctx.config
  return poison.from_config(images, ctx.train_labels, ctx.trigger, poison_block=cfg.poison,
                            trigger_block=cfg.trigger, num_classes=ctx.dataset.num_classes,
                            seed=cfg.seed)


def training_sets(ctx: RunContext) -> dict[str, poison.PoisonedSet]:
  """The backdoored model's poisoned training set and the vanilla model's clean one (for an
  attack made on the clean model, the backdoored one is only right once it is prepared)."""
  return {"backdoored": backdoored_set(ctx, ctx.train_images),
          "vanilla": poison.clean(ctx.train_images, ctx.train_labels)}


def _initial_state(ctx: RunContext, num_examples: int):
  model = ctx.model()
  return model, train.initial_state(model, ctx.config.train, image_shape=ctx.dataset.image_shape,
                                    num_examples=num_examples, seed=ctx.config.seed)


def training_epochs(config) -> int:
  """Epochs over the training set the stage runs: both models', and ABL's model's (its
  isolation and fine-tuning; unlearning sees only the isolated few) when it is on."""
  abl_epochs = config.abl.isolation_epochs + config.abl.finetuning_epochs
  return len(MODEL_KINDS) * config.train.epochs + (abl_epochs if config.abl.enabled else 0)


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
  bar = ctx.progress.bar(f"train {kind}", cfg.epochs * steps,
                         part=cfg.epochs / training_epochs(ctx.config), initial=start_epoch * steps)
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


def clean_model(ctx: RunContext, model, variables) -> attacks.CleanModel:
  """The vanilla model and the run's training images, as a prepared attack sees them."""
  probe = model.default_probe
  return attacks.CleanModel(
      logits=jax.jit(lambda images: model.apply(variables, images)[0]),
      features=jax.jit(lambda images: model.apply(variables, images, stop=probe)[0]),
      images=ctx.train_images, labels=ctx.train_labels, target=ctx.config.poison.target,
      key=keys.run_key(ctx.config.seed, keys.ATTACK_PREPARATION))


def prepared_path(workdir: str) -> str:
  return os.path.join(workdir, "train", PREPARED_FILE)


def read_prepared_trigger(workdir: str, built):
  """The prepared attack's trigger saved in `workdir`, in the structure of `built` (the
  trigger the config builds); `built` itself when the run has none."""
  path = prepared_path(workdir)
  if not os.path.exists(path):
    return built
  with np.load(path) as saved:
    leaves = [saved[f"trigger_{i}"] for i in range(len(jax.tree.leaves(built)))]
  shapes = [np.shape(leaf) for leaf in jax.tree.leaves(built)]
  if [leaf.shape for leaf in leaves] != shapes:
    raise checkpoints.CheckpointError(f"{path}: holds a trigger of another shape; delete "
                                      f"{os.path.dirname(path)} and results.json to train again")
  return jax.tree.unflatten(jax.tree.structure(built), [jnp.asarray(leaf) for leaf in leaves])


def prepare_attack(ctx: RunContext, model, variables) -> np.ndarray:
  """Makes the attack on the vanilla model, or reads it back: sets `ctx.trigger` and returns
  the training images with the poisoned examples' replaced where the attack perturbs them."""
  cfg, path = ctx.config, prepared_path(ctx.workdir)
  images = np.array(ctx.train_images)
  indices = poison.select_poison_indices(ctx.train_labels, rate=cfg.poison.rate,
                                         target=cfg.poison.target, mode=cfg.poison.mode,
                                         seed=cfg.seed, clean_label=cfg.trigger.clean_label)
  if os.path.exists(path):
    logging.info("train: the attack prepared on the vanilla model, read from %s", path)
    ctx.trigger = read_prepared_trigger(ctx.workdir, ctx.trigger)
    with np.load(path) as saved:
      if "poisoned_images" in saved:
        images[indices] = saved["poisoned_images"]
    return images
  started = time.perf_counter()
  trigger, perturb = attacks.prepare(cfg.trigger, ctx.trigger, clean_model(ctx, model, variables))
  saved = {f"trigger_{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(trigger))}
  if perturb is not None:
    saved["poisoned_images"] = np.asarray(perturb(images[indices], ctx.train_labels[indices]),
                                          np.uint8)
    images[indices] = saved["poisoned_images"]
  files.write_npz(path, **saved)
  logging.info("train: %s prepared on the vanilla model in %.1f s", cfg.trigger.kind,
               time.perf_counter() - started)
  ctx.trigger = trigger
  return images


def run(ctx: RunContext) -> dict:
  """Trains both models (the vanilla one first when the attack is made on it), then
  evaluates both with the attack's final trigger."""
  cfg = ctx.config
  stage_dir = ctx.stage_dir("train")
  prepared = attacks.needs_clean_model(cfg.trigger)
  result, log, trained = {}, {kind: {} for kind in MODEL_KINDS}, {}
  for kind in (("vanilla", "backdoored") if prepared else MODEL_KINDS):
    if kind == "vanilla":
      training_set = poison.clean(ctx.train_images, ctx.train_labels)
      if ctx.shared is not None:
        trained[kind] = _shared_vanilla(ctx, training_set, log[kind])
        continue
    else:
      images = prepare_attack(ctx, *trained["vanilla"]) if prepared else ctx.train_images
      training_set = poisoned_set = backdoored_set(ctx, images)
      files.write_npz(os.path.join(stage_dir, "split.npz"),
                      clean_set_indices=ctx.split.clean_set_indices,
                      train_indices=ctx.split.train_indices,
                      poison_indices=training_set.poison_indices,
                      noise_indices=training_set.noise_indices)
      result["poisoned"] = int(len(training_set.poison_indices))
    trained[kind] = _train_model(ctx, kind, training_set, log[kind])
  for kind in MODEL_KINDS:
    model, variables = trained[kind]
    result[kind] = metrics.evaluate(
        model.apply, variables, ctx.dataset.test_images, ctx.dataset.test_labels, ctx.trigger,
        target=cfg.poison.target, mode=cfg.poison.mode, num_classes=ctx.dataset.num_classes,
        batch_size=cfg.train.eval_batch_size)
    log[kind]["test"] = result[kind]
    logging.info("train/%s: CA %.2f ASR %.2f RA %.2f", kind, result[kind]["CA"],
                 result[kind]["ASR"], result[kind]["RA"])
  result["clean_set"] = int(len(ctx.split.clean_set_indices))
  ordered = {kind: result[kind] for kind in (*MODEL_KINDS, "poisoned", "clean_set")}
  if cfg.abl.enabled:
    ordered["abl"] = log["abl"] = _anti_backdoor_learning(ctx, poisoned_set, result["backdoored"])
  files.write_json(os.path.join(stage_dir, "metrics.json"), log)
  return ordered


def _anti_backdoor_learning(ctx: RunContext, training_set: poison.PoisonedSet,
                            backdoored: dict) -> dict:
  """ABL's model on the backdoored model's training set (linfjax/training/abl.py), trained
  unless its checkpoint is there; its CA / ASR / RA, DER against `backdoored`, and how many
  of the examples it isolated are poisoned."""
  cfg = ctx.config
  model = ctx.model()
  store = checkpoints.StageCheckpoints(checkpoint_dir(ctx.workdir, "abl"))
  count = abl.isolated_count(len(training_set.labels), cfg.abl.isolation_ratio)
  like = {"variables": models.init(model, jax.random.key(0), ctx.dataset.image_shape),
          "isolated": np.zeros(count, np.int32)}
  if store.latest_step() == 1:
    saved = store.restore(like)
  else:
    bar = ctx.progress.bar("train abl", 3, unit="phase", part=(
        cfg.abl.isolation_epochs + cfg.abl.finetuning_epochs) / training_epochs(cfg))
    variables, isolated = abl.anti_backdoor_learning(
        model, train.to_device(training_set), ctx.trigger, train.Recipe.from_config(cfg.train),
        abl.Settings.from_config(cfg.abl), image_shape=ctx.dataset.image_shape, seed=cfg.seed,
        on_phase=lambda name: (logging.info("train/abl: %s", name), bar.update(1)))
    bar.close()
    saved = {"variables": variables, "isolated": isolated.astype(np.int32)}
    store.save(1, saved)
  store.close()
  numbers = metrics.evaluate(
      model.apply, saved["variables"], ctx.dataset.test_images, ctx.dataset.test_labels,
      ctx.trigger, target=cfg.poison.target, mode=cfg.poison.mode,
      num_classes=ctx.dataset.num_classes, batch_size=cfg.train.eval_batch_size)
  isolated = np.asarray(saved["isolated"])
  numbers["DER"] = metrics.der(ca_before=backdoored["CA"], ca_after=numbers["CA"],
                               asr_before=backdoored["ASR"], asr_after=numbers["ASR"])
  numbers["isolated"] = int(len(isolated))
  numbers["isolated_poisoned"] = int(np.isin(isolated, training_set.poison_indices).sum())
  logging.info("train/abl: CA %.2f ASR %.2f RA %.2f; %d of its %d isolated examples poisoned",
               numbers["CA"], numbers["ASR"], numbers["RA"], numbers["isolated_poisoned"],
               numbers["isolated"])
  return numbers
