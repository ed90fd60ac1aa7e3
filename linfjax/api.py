"""The paper's pipeline as functions a notebook can call, one per step of a run.

    dataset = load_dataset(config)                     # config: linfjax.config.base_config()
    split = clean_set(dataset, size=500, seed=0)       # the defender's clean set S
    trigger = make_attack("patch", dataset.image_shape)
    model, variables = train(config, dataset, split, trigger)
    evaluate(model, variables, dataset, trigger, target=0)            # {'CA', 'ASR', 'RA'}
    found = reverse_engineer(model, variables, s_images, settings=config.reverse, seed=0)
    verdict = detect(found)                            # flagged class (or None) and suspect
    shifts = activation_shifts(model, variables, s_images, trigger)  # per layer and norm
    record = defend("linf", model, variables, s_images, s_labels,
                    trigger=found.trigger(verdict.suspect), target=verdict.suspect)

Each function is a thin layer over the library the pipeline's stages use, with the same
random streams (linfjax/keys.py), so `train` gives the model the `train` stage trains from
the same config, `reverse_engineer` the stage's masks, and `defend` the prune stage's
choice. `run(config, workdir)` runs every stage into a directory and `load_run(workdir)`
reads one back: its config, results.json, models and synthetic trigger.

Images are uint8 [N, H, W, C] as datasets hold them (floats in [0, 1] work too); labels int
[N]; a trigger is any linfjax.attacks trigger (`attacks.Trigger`, `Signal`, `Warp`).

References:
  Xu et al., "Defending against Backdoor Attack on Deep Neural Networks", arXiv 2002.12162.
  Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
  Networks", IEEE S&P 2019.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import ml_collections
import numpy as np
from jax.typing import ArrayLike

from linfjax import attacks, data, defenses, keys, models
from linfjax import config as config_lib
from linfjax.attacks import poison as poison_lib
from linfjax.defenses import pruning
from linfjax.detection import neural_cleanse, norms, outliers
from linfjax.runs import pipeline
from linfjax.runs.stages import reverse as reverse_stage
from linfjax.runs.stages import train as train_stage
from linfjax.runs.stages.context import RunContext
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
    ConfigError: an invalid config field; TrainingDiverged: a non-finite loss.
  """
  config_lib.validate(config)
  config_lib.validate_against_data(config, image_shape=dataset.image_shape,
                                   num_classes=dataset.num_classes,
                                   num_train=len(dataset.train_labels))
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


def _nc_settings(settings) -> neural_cleanse.Settings:
  if settings is None:
    return neural_cleanse.Settings()
  if isinstance(settings, neural_cleanse.Settings):
    return settings
  block = _block(settings, "reverse", "steps")
  neural_cleanse.Settings.check_block(block, "reverse")
  return neural_cleanse.Settings.from_config(block)


def reverse_engineer(model: models.LayeredClassifier, variables: Variables, images: ArrayLike,
                     *, settings: neural_cleanse.Settings | ml_collections.ConfigDict | None = None,
                     seed: int = 0,
                     on_step: Callable[[int, Any, dict], None] | None = None
                     ) -> neural_cleanse.Reversed:
  """Neural Cleanse: the smallest mask-and-pattern trigger that sends S to each class.

  All classes are solved in one vmapped optimisation with the key the `reverse` stage
  uses for this seed, so a run's masks come back.

  Args:
    model, variables: the classifier under suspicion.
    images: the defender's clean set S, uint8 [N, H, W, C].
    settings: `neural_cleanse.Settings`, or a config (or its `reverse` block); None:
      the full-size defaults (`config.make_quick` sets a laptop budget).
    seed: the run's seed.
    on_step: called as `on_step(steps_done, state, means)` after each step; `means` holds
      every class's [K] 'success', 'l1' and 'loss'.

  Returns:
    `Reversed`: masks [K, H, W], patterns [K, H, W, C], `mask_l1` [K] and `succeeded`
    [K] (reached the attack-success threshold); `.trigger(c)` is class c's trigger.
  """
  state = neural_cleanse.solve(model.apply, variables, images, num_classes=model.num_classes,
                               key=keys.run_key(seed, keys.REVERSE),
                               settings=_nc_settings(settings), on_step=on_step)
  return neural_cleanse.result(state)


def detect(reversed_or_norms: neural_cleanse.Reversed | ArrayLike, *,
           succeeded: ArrayLike | None = None, statistic: str | None = None,
           threshold: float | None = None) -> outliers.Detection:
  """Flags the class whose reverse-engineered mask is an outlier below the median.

  Args:
    reversed_or_norms: `reverse_engineer`'s outcome, or the classes' mask l1 norms [K].
    succeeded: [K] bool, the classes whose solve reached the attack-success threshold
      (only they count); taken from a `Reversed`, else all classes.
    statistic: an outlier index of `outliers.STATISTICS`: "nc" (Neural Cleanse's MAD
      index), "log", or "ratio" (median norm / class norm); None: the config's default, "ratio".
    threshold: the index a class must exceed; None: the statistic's default (nc: 2).

  Returns:
    `Detection`: `flagged` (a class or None), `suspect` (the flagged class, else the
    smallest mask that succeeded), and the index of every class.
  """
  if isinstance(reversed_or_norms, neural_cleanse.Reversed):
    mask_norms = reversed_or_norms.mask_l1
    succeeded = reversed_or_norms.succeeded if succeeded is None else succeeded
  else:
    mask_norms = np.asarray(reversed_or_norms)
  if succeeded is None:
    succeeded = np.ones(np.shape(mask_norms), bool)
  statistic = outliers.Settings().statistic if statistic is None else statistic
  return outliers.detect(mask_norms, succeeded, statistic=statistic, threshold=threshold)


@functools.lru_cache(maxsize=None)
def _probing(model: models.LayeredClassifier, layers: tuple[str, ...]) -> models.LayeredClassifier:
  """`model` reporting the activations of `layers`; one object per setting, so its jitted
  functions compile once (modules with equal fields are equal and hash alike)."""
  if tuple(model.probe_layers) == layers:
    return model
  return model.clone(probe_layers=layers)


class LayerShifts(NamedTuple):
  """One layer's activation norms over a set of images, clean and triggered.

  moments: per-neuron running moments; `mean` and `m2` are [2, 3, K] (condition 0
    clean, 1 triggered; norms in `norms.NORMS` order, l1, l2, linf).
  delta: norm -> [K] float64, `mean ||A_k(T(x))||_p - mean ||A_k(x)||_p` per neuron.
  summary: norm -> {'z', 'top1_share', 'rel'}: how far the largest shift stands out
    (z-score), the share of the positive shift on the top 1 % of neurons, and the
    largest shift relative to its neuron's clean norm.
  """
  moments: norms.Moments
  delta: dict[str, np.ndarray]
  summary: dict[str, dict[str, float]]


def activation_shifts(model: models.LayeredClassifier, variables: Variables, images: ArrayLike,
                      trigger: attacks.AnyTrigger, *, layers: Sequence[str] | None = None,
                      batch_size: int = 500) -> dict[str, LayerShifts]:
  """How a trigger moves the l1, l2 and linf norms of every neuron's activation map.

  A neuron's norms are those of its map `A_k` [H', W']: `sum |A_k|`, `sqrt(sum A_k^2)`
  and `max |A_k|`; the paper's observation is that a trigger inflates the linf norm of a
  few neurons far more than the others. One forward pass per batch covers the clean
  and the triggered images.

  Args:
    model, variables: the classifier.
    images: uint8 [N, H, W, C] (S, typically).
    trigger: the trigger whose effect is measured (real or synthetic).
    layers: the layers to measure; None: the model's probe layers (by default its last
      conv map).
    batch_size: images per compiled call.

  Returns:
    layer -> `LayerShifts`.
  """
  layers = tuple(layers or model.probe_layers or (model.default_probe,))
  probing = _probing(model, layers)
  moments = norms.norm_statistics(probing.apply, variables, images, [trigger],
                                  batch_size=batch_size)
  return {layer: LayerShifts(moments[layer],
                             dict(zip(norms.NORMS, norms.shifts(moments[layer])[0])),
                             norms.layer_summary(moments[layer], 0))
          for layer in layers}


def defend(name: str, model: models.LayeredClassifier, variables: Variables,
           clean_images: ArrayLike, clean_labels: ArrayLike, *,
           trigger: attacks.AnyTrigger | None = None, target: int | None = None,
           mode: str = "all_to_one", config: ml_collections.ConfigDict | None = None,
           settings: Any = None, layer: str | None = None) -> defenses.Record:
  """Runs one defense of `defenses.DEFENSES` as the prune stage does, on S only.

  "linf", "l2" and "l1" are the paper's defense: rank layer L's neurons by how much the
  defender's trigger shifts their norm on S, and prune (mask) the top r*, the fewest that
  bring the defender-side ASR on S to `tau` with at most `delta` points of CA lost there.

  Args:
    name: a DEFENSES name ("linf", "l2", "l1", "fine_pruning", "linf_ft", "anp", ...).
    model, variables: the backdoored classifier (never modified).
    clean_images, clean_labels: the defender's clean set S, uint8 [N, H, W, C], int [N].
    trigger, target: the defender's trigger and the class it sends images to (the
      synthetic trigger: `reverse_engineer(...).trigger(c)` and c); needed by the
      defenses that use a trigger.
    mode: the poisoning mode the defender assumes.
    config: a run config (checked first) whose `prune` block (settings, layer L), `train`
      block (fine-tuning's recipe) and seed are used; None: `config.base_config()`.
    settings: the defense's own settings (`defense.from_config(prune_block)` gives them),
      overriding the config's; a `pruning.Settings` with a `layer` sets L.
    layer: L, overriding the settings and config; default the model's last conv map.

  Returns:
    `Record`: `pruned` (r*), `masks` ({layer: [K] in {0, 1}}, or None), `variables` (new
    ones for a defense that fine-tunes, else None), `curve` (the levels swept on S) and
    `details`. Evaluate the defended model with `evaluate(..., masks=record.masks)`.
  """
  if name not in defenses.DEFENSES:
    raise ValueError(f"unknown defense {name!r}; known: {', '.join(defenses.DEFENSES)}")
  defense = defenses.DEFENSES[name]
  if defense.needs_trigger and (trigger is None or target is None):
    raise ValueError(f"defense {name!r} needs the defender's trigger and target")
  if config is None:
    config = config_lib.base_config()
  else:
    config_lib.validate(config)
  values = defense.from_config(config.prune) if settings is None else settings
  layer = layer or getattr(settings, "layer", "") or config.prune.layer or model.default_probe
  layers = tuple(dict.fromkeys((layer, *defense.layers(model, config.prune))))
  inputs = defenses.Inputs(
      model=_probing(model, layers), variables=variables, images=np.asarray(clean_images),
      labels=np.asarray(clean_labels), trigger=trigger, target=target, mode=mode, layer=layer,
      seed=config.seed, recipe=config.train, eval_batch_size=config.train.eval_batch_size)
  return defense.run(inputs, values)


class SyntheticTrigger(NamedTuple):
  """The reverse stage's suspect class, its trigger, and whether Neural Cleanse flagged it."""
  trigger: attacks.Trigger
  target: int
  flagged: bool


class Run:
  """A run directory: its config and results, and, loaded when first asked for, its data,
  trained models and synthetic trigger.

  Attributes:
    workdir: the directory.
    config: the run's config (ConfigDict), as config.json saved it.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, *,
               dataset: data.Dataset | None = None):
    self.workdir = workdir
    self.config = config
    self._dataset = dataset
    self._models: dict[str, ModelAndVariables] = {}

  def __repr__(self) -> str:
    return f"Run({self.workdir!r}, stages done: {sorted(set(self.results) - {'seed'})})"

  @property
  def results(self) -> dict:
    """results.json as it is now ({} before the first stage finished)."""
    return pipeline.read_results(self.workdir) or {}

  @functools.cached_property
  def context(self) -> RunContext:
    """What the stages receive: the data (loaded now), S and the attack's trigger."""
    return pipeline.make_context(self.config, self.workdir, progress=False,
                                 dataset=self._dataset)

  @property
  def dataset(self) -> data.Dataset:
    return self.context.dataset

  @property
  def split(self) -> data.Split:
    return self.context.split

  @property
  def trigger(self) -> attacks.AnyTrigger:
    """The attack's own (real) trigger."""
    return self.context.trigger

  @property
  def clean_set(self) -> tuple[np.ndarray, np.ndarray]:
    """S: uint8 images [|S|, H, W, C] and labels [|S|]."""
    return self.context.clean_set

  def model(self, kind: str = "backdoored") -> ModelAndVariables:
    """The trained `kind` model ('backdoored' or 'vanilla') and its variables, restored
    from the run's final checkpoint.

    Raises:
      CheckpointError: the train stage has not finished that model.
    """
    if kind not in train_stage.MODEL_KINDS:
      raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(train_stage.MODEL_KINDS)}")
    if kind not in self._models:
      self._models[kind] = train_stage.load_trained(self.context, kind)
    return self._models[kind]

  @property
  def backdoored(self) -> ModelAndVariables:
    return self.model("backdoored")

  @property
  def vanilla(self) -> ModelAndVariables:
    return self.model("vanilla")

  @property
  def synthetic_trigger(self) -> SyntheticTrigger | None:
    """The reverse stage's trigger for the suspect class; None when it wrote none (no
    reverse stage yet, or no class reached the attack-success threshold)."""
    loaded = reverse_stage.load_synthetic_trigger(self.workdir, self.dataset.image_shape,
                                                  self.dataset.num_classes)
    return None if loaded is None else SyntheticTrigger(*loaded)


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = False,
        dataset: data.Dataset | None = None) -> Run:
  """Runs the config's stages (train, reverse, analysis, prune) into `workdir`.

  The command line's run (`python -m linfjax.main`): a rerun skips finished stages and
  resumes a killed one; a workdir of another config is refused.

  Args:
    config: a run config; checked before anything is computed.
    workdir: the run directory (created).
    progress: show progress bars.
    dataset: `config.data` already loaded (else loaded here).

  Returns:
    The finished `Run`.
  """
  pipeline.run(config, workdir, progress=progress, dataset=dataset)
  return Run(workdir, config, dataset=dataset)


def load_run(workdir: str, *, dataset: data.Dataset | None = None) -> Run:
  """Opens a run directory written by `run` or `python -m linfjax.main`.

  Args:
    workdir: the run directory.
    dataset: the run's data already loaded; else loaded from `config.data` (relative
      paths from the working directory) when a model or S is first asked for.

  Raises:
    WorkdirError: `workdir` holds no readable config.json.
  """
  return Run(workdir, pipeline.read_config(workdir), dataset=dataset)


__all__ = [
    "LayerShifts", "Run", "SyntheticTrigger", "activation_shifts", "clean_set", "defend",
    "detect", "evaluate", "load_dataset", "load_run", "make_attack", "poison",
    "reverse_engineer", "run", "train",
]
