"""The API's first steps: data, the clean set S, attacks, poisoning, training, evaluation."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np
from jax.typing import ArrayLike

from linfjax import attacks, data, keys, models
from linfjax import config as config_lib
from linfjax.attacks import poison as poison_lib
from linfjax.defenses import pruning
from linfjax.training import metrics
from linfjax.training import train as train_lib

Variables = Any  # A model's {'params', 'batch_stats'} pytree.
ModelAndVariables = tuple[models.LayeredClassifier, Variables]


def _block(config_or_block: ml_collections.ConfigDict, name: str, field: str):
  """A run config's block `name`, or the block itself when given one (it has `field`)."""
  if not isinstance(config_or_block, ml_collections.ConfigDict):
    raise TypeError(f"expected a run config or its `{name}` block (an ml_collections "
                    f"ConfigDict), got {type(config_or_block).__name__}")
  if field in config_or_block:
    return config_or_block
  if name in config_or_block:
    return config_or_block[name]
  raise TypeError(f"this ConfigDict is neither a run config nor its `{name}` block (it has no "
                  f"`{name}` and no `{field}` field)")


def load_dataset(config_or_data_block: ml_collections.ConfigDict) -> data.Dataset:
  """Loads the dataset a config names, after checking its `data` block.

  Args:
    config_or_data_block: a run config (`linfjax.config.base_config()` and variants) or
      its `data` block. Relative paths are relative to the working directory.

  Returns:
    A `Dataset`: uint8 images [N, H, W, C], int32 labels, class names, and GTSRB's
    track ids where the source has them, limited by `train_limit` / `test_limit`.

  Raises:
    ConfigError: a field of the block is invalid (named in the message).
    DatasetError: the data are missing or not what their format promises.
  """
  block = _block(config_or_data_block, "data", "source")
  data.sources.Settings.check_block(block, "data")
  return data.load(block)


def clean_set(dataset: data.Dataset, *, size: int, seed: int) -> data.Split:
  """Holds out the defender's clean set S from the training images.

  S is drawn as the pipeline draws it from the config's seed: whole groups of
  near-duplicates where the dataset has them (GTSRB's tracks, so at least `size` images),
  else `size` images at random.

  Args:
    dataset: the dataset whose training images are split.
    size: |S| (`config.data.clean_set_size`).
    seed: the run's seed (`config.seed`).

  Returns:
    A `Split`: `clean_set_indices` (S) and `train_indices` (the rest), sorted indices
    into `dataset.train_images`.
  """
  return data.clean_set_split(dataset, size=size, seed=seed)


def make_attack(name_or_trigger_block: str | ml_collections.ConfigDict,
                image_shape: Sequence[int], **overrides: Any) -> attacks.AnyTrigger:
  """Builds an attack's trigger for images of `image_shape`.

  Args:
    name_or_trigger_block: an attack of `attacks.ATTACKS` ("patch": BadNets' 3x3 white
      corner, "blend", "sig", "wanet"), starting from its preset, or a config's `trigger`
      block.
    image_shape: (H, W, C) of the images the trigger is stamped on.
    **overrides: `trigger` block fields to change, e.g. `size=5, position="top_left"`.

  Returns:
    The trigger: a pytree of arrays; `attacks.apply(trigger, images)` stamps it.

  Raises:
    TriggerError: an unknown attack or field.
    ConfigError: a field value the attack cannot use (named in the message).
  """
  if isinstance(name_or_trigger_block, str):
    if name_or_trigger_block not in attacks.PRESETS:
      raise attacks.TriggerError(f"unknown attack {name_or_trigger_block!r}; known: "
                                 f"{', '.join(attacks.PRESETS)}")
    block = attacks.trigger_block()
    block.update(attacks.PRESETS[name_or_trigger_block])
  else:
    block = ml_collections.ConfigDict(_block(name_or_trigger_block, "trigger", "kind").to_dict())
  unknown = sorted(set(overrides) - set(block.keys()))
  if unknown:
    raise attacks.TriggerError(f"unknown trigger field(s) {', '.join(unknown)}; known: "
                               f"{', '.join(sorted(block.keys()))}")
  block.update(overrides)
  attacks.check(block, None)
  attacks.check_data(block, tuple(image_shape))
  return attacks.from_config(block, tuple(image_shape))


def _train_subset(dataset: data.Dataset, split: data.Split) -> tuple[np.ndarray, np.ndarray]:
  return dataset.train_images[split.train_indices], dataset.train_labels[split.train_indices]


def poison(config: ml_collections.ConfigDict, dataset: data.Dataset, split: data.Split,
           trigger: attacks.AnyTrigger) -> poison_lib.PoisonedSet:
  """The backdoored model's training set, poisoned as the `train` stage poisons it.

  `round(config.poison.rate * N)` of the N training images (not S), drawn with the
  config's seed, are relabelled to the target (all-to-one) or the next class (all-to-all)
  and flagged for the trigger; `config.trigger.clean_label` and `cross_ratio` poison as
  SIG and WaNet do (linfjax/attacks/poison.py).

  Args:
    config: a run config (its `poison` and `trigger` blocks and `seed`).
    dataset, split: the data and the held-out S.
    trigger: the attack's trigger (`make_attack`); stamped now only when
      `config.poison.stamp` is "before_augmentation".

  Returns:
    A `PoisonedSet`: uint8 images [N, H, W, C], the labels trained on, the per-example
    stamp flags and the poisoned indices (positions among the training images).
  """
  images, labels = _train_subset(dataset, split)
  return poison_lib.from_config(images, labels, trigger, poison_block=config.poison,
                                trigger_block=config.trigger,
                                num_classes=dataset.num_classes, seed=config.seed)


def train(config: ml_collections.ConfigDict, dataset: data.Dataset, split: data.Split,
          trigger: attacks.AnyTrigger, *, backdoored: bool = True,
          on_epoch_end: Callable[[int, dict], None] | None = None) -> ModelAndVariables:
  """Trains the backdoored (or the vanilla) model exactly as a run's `train` stage does.

  The same model, initial weights, optimizer, shuffles, augmentation and poisoning as
  `linfjax.runs.pipeline.run` with this config, dataset and split, so the variables are
  those of the run's checkpoint (without writing one).

  Args:
    config: a run config (checked first); its `model`, `train`, `poison` blocks and
      seed are used.
    dataset, split: the data and the held-out S (`clean_set`); the model trains on the
      other images.
    trigger: the attack's trigger; the vanilla model trains on clean data.
    backdoored: False trains the vanilla model (same recipe and seed, nothing poisoned).
    on_epoch_end: called as `on_epoch_end(epoch, {'loss', 'accuracy'})` after each epoch
      (epochs counted from 1), e.g. to print progress.

  Returns:
    (model, variables): a `LayeredClassifier`, and its {'params', 'batch_stats'};
    `model.apply(variables, images)` gives (logits [B, K], probe activations).

  Raises:
    ConfigError: an invalid config field; TrainingDiverged: a non-finite loss;
    TriggerError: a backdoored model of an attack made on a clean model (`attacks.Attack`'s
      `prepare`), which only `run` trains.
  """
  config_lib.validate(config)
  config_lib.validate_against_data(config, image_shape=dataset.image_shape,
                                   num_classes=dataset.num_classes,
                                   num_train=len(dataset.train_labels))
  if backdoored and attacks.needs_clean_model(config.trigger):
    raise attacks.TriggerError(
        f"the {config.trigger.kind} attack is made on a clean model, which `train` does not "
        "do; `run(config, workdir)` trains the vanilla model first, prepares the attack on it "
        "and trains the backdoored one (`load_run(workdir).trigger` is the prepared trigger)")
  images, labels = _train_subset(dataset, split)
  training_set = (poison(config, dataset, split, trigger) if backdoored else
                  poison_lib.clean(images, labels))
  model = models.from_config(config.model, num_classes=dataset.num_classes,
                             channel_stats=dataset.channel_stats,
                             compute_dtype=config.train.compute_dtype)
  state = train_lib.initial_state(model, config.train, image_shape=dataset.image_shape,
                                  num_examples=len(training_set.labels), seed=config.seed)
  callback = None
  if on_epoch_end is not None:
    callback = lambda epoch, state, epoch_metrics: on_epoch_end(epoch + 1, epoch_metrics)
  state = train_lib.fit(state, train_lib.to_device(training_set), trigger,
                        train_lib.Recipe.from_config(config.train),
                        key=keys.run_key(config.seed, keys.TRAIN_STEPS), on_epoch_end=callback)
  return model, train_lib.variables(state)


def _images_and_labels(split) -> tuple[np.ndarray, np.ndarray]:
  if isinstance(split, data.Dataset):
    return split.test_images, split.test_labels
  images, labels = split
  return np.asarray(images), np.asarray(labels)


def _earliest(model: models.LayeredClassifier, layers) -> str:
  return min(layers, key=models.layer_names(model).index)


def evaluate(model: models.LayeredClassifier, variables: Variables,
             dataset: data.Dataset | tuple[ArrayLike, ArrayLike], trigger: attacks.AnyTrigger,
             *, target: int, mode: str = "all_to_one",
             masks: Mapping[str, ArrayLike] | None = None,
             batch_size: int = 500) -> dict[str, float]:
  """Clean accuracy, attack success and robust accuracy of a model, in percent.

  CA: accuracy on the clean images. ASR: among the images the attack can flip (label not
  the attack's label), the share classified as the attack's label once triggered. RA:
  among the same triggered images, the share still classified as their true label.

  Args:
    model, variables: the classifier (`train`, `load_run`).
    dataset: a `Dataset` (its test split) or (images [N, H, W, C], labels [N]).
    trigger: the trigger whose success is measured (usually the attack's real one).
    target: the attack's target class; mode: "all_to_one" (y -> target) or "all_to_all"
      (y -> y + 1 mod K).
    masks: layer -> [K_layer] channel masks of a pruned model (`defend(...).masks`).
    batch_size: images per compiled call.

  Returns:
    {'CA', 'ASR', 'RA'}, floats in [0, 100].
  """
  images, labels = _images_and_labels(dataset)
  if not masks:
    return metrics.evaluate(model.apply, variables, images, labels, trigger, target=target,
                            mode=mode, num_classes=model.num_classes, batch_size=batch_size)
  stacks = {layer: np.asarray(mask, np.float32)[None] for layer, mask in masks.items()}
  numbers = pruning.sweep(model.apply, variables, images, labels, trigger, stacks,
                          start=_earliest(model, stacks), target=target, mode=mode,
                          num_classes=model.num_classes, batch_size=batch_size, mask_batch=1)
  return {key: float(values[0]) for key, values in numbers.items()}
