"""RNP: Reconstructive Neuron Pruning (unlearn on S, recover with neuron masks, prune).

1. Unlearn: the backdoored model is trained on S by gradient ASCENT on the cross-entropy
   (SGD, momentum 0.9, coupled weight decay 5e-4, the rate divided by 10 after epochs 10 and
   20), batch norm in training mode, until the accuracy of an epoch's own predictions (made
   before each update, on the augmented batches) is at most `clean_threshold`, or for
   `unlearning_epochs` epochs.
2. Recover: on the unlearned model, every batch-norm neuron gets a mask `m_k` in [0, 1]
   (initially 1) multiplying its scale (`gamma_k * m_k`, bias kept); only the masks learn,
   by SGD (momentum 0.9) on `alpha * CE` over S for `recovering_epochs` epochs, clipped to
   [0, 1] after each step. This is ANP's mask step without noise (`anp.mask_step` with
   eps 0), run in epochs over shuffled S.
3. Prune the ORIGINAL model: the mask values, rounded to 4 decimals as both references write
   and read them back, at or below `threshold` (or the `pruning_number` smallest) mark the
   neurons whose batch-norm scale is set to 0, the bias kept (`anp_pruning`'s helpers).
Only S enters; the trigger is not used. The Record has new variables (the neurons live in
every batch-norm layer, not in one probed layer, so there are no channel masks) and
`pruned` neurons.

Follows Li et al., "Reconstructive Neuron Pruning for Backdoor Defense", ICML 2023, as read
(not copied) in the authors' github.com/bboylyg/RNP main.py at 966e060 and BackdoorBench's
defense/rnp.py, config/defense/rnp/config.yaml and
utils/defense_utils/rnp/rnp_model/mask_batchnorm.py at 3f4b1a9 (SCLBD/BackdoorBench):
  - Both: unlearning lr 0.01, momentum 0.9, decay 5e-4, MultiStepLR [10, 20] x 0.1, stop when
    the epoch's training accuracy <= clean_threshold 0.2; recovering lr 0.2, momentum 0.9,
    alpha 0.2, 20 epochs; mask on the batch-norm weight only; masks written with '{:.4f}';
    pruning zeroes the batch-norm weight of the original model, masks sorted ascending.
  - Both call clip_grad_norm_(max_norm=20) BEFORE the backward pass, on gradients already
    zeroed, so it clips nothing; linfjax does not clip.
  - Unlearning runs at most `unlearning_epochs` epochs (BackdoorBench's loop; the authors'
    runs one more, range(0, E + 1)); where the threshold is never reached the last model is
    used (BackdoorBench; the authors' script then finds no checkpoint) and details say so.
  - Pruning: the authors' script only prints every threshold 0, 0.05, ..., 0.9 (the log in
    their README has the ASR at or below 6.6 % from 0.2 on); linfjax prunes at `threshold`
    0.2. BackdoorBench's returned model prunes at its `pruning_number` (default 0.70) used
    as a threshold (`pruning_max = pruning_step = pruning_number`); threshold=0.7 gives it. With
    pruning_by="number" linfjax prunes the `pruning_number` smallest masks (BackdoorBench's
    path there, with max = step = pruning_number, prunes 2 * ceil(pruning_number)).
Differences: batch 128 is the authors' (BackdoorBench's config: 256); each epoch drops the
last partial batch (linfjax's convention; the references keep it); augmentation is the
training recipe's crop padding, flip and padding mode (the references: crop, pad 4 with
zeros, flip); the unlearning's momentum and decay are the references' constants, not the
training recipe's. The quick variant shortens both phases (`make_quick`: 10 unlearning, 5
recovering epochs).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from linfjax import keys, pixels
from linfjax import settings as settings_lib
from linfjax.defenses import anp, bn
from linfjax.defenses.anp_pruning import (as_written, keep_above, keep_all_but_smallest,
                                          num_pruned, pruned_variables)
from linfjax.defenses.base import Defense, Inputs, Record
from linfjax.settings import choice, integer, number, spec
from linfjax.training import train

MOMENTUM = 0.9  # Both phases' SGD momentum (both references).
WEIGHT_DECAY = 5e-4  # The unlearning SGD's coupled decay (both references).
MILESTONES = (10, 20)  # Epochs after which the unlearning rate is divided by 10 (both).


@dataclasses.dataclass(frozen=True)
class Settings(settings_lib.Settings):
  """The `prune.rnp` block (defaults: the authors', which BackdoorBench shares)."""
  unlearning_lr: float = spec(0.01, number(0.0, 10.0, low_open=True),
                              "Gradient-ascent SGD rate on S (both: 0.01).")
  unlearning_epochs: int = spec(20, integer(1), "Most unlearning epochs (both: 20).")
  clean_threshold: float = spec(0.2, number(0.0, 1.0),
                                "Unlearning stops once an epoch's accuracy on S is <= this "
                                "(both: 0.2).")
  recovering_lr: float = spec(0.2, number(0.0, 10.0, low_open=True),
                              "Mask SGD rate (both: 0.2).")
  recovering_epochs: int = spec(20, integer(1), "Mask-recovery epochs over S (both: 20).")
  alpha: float = spec(0.2, number(0.0, 1.0, low_open=True),
                      "Weight of the recovery cross-entropy (both: 0.2).")
  batch_size: int = spec(128, integer(1), "Images per step (the authors' 128; BackdoorBench's "
                         "256).")
  pruning_by: str = spec("threshold", choice(*anp.PRUNING_BY),
                         '"threshold": mask value <= threshold; "number": the smallest ones.')
  threshold: float = spec(0.2, number(0.0, 1.0),
                          "Prune masks at or below this (0.2; BackdoorBench's model: 0.7).")
  pruning_number: int = spec(0, integer(0), 'With pruning_by="number": how many to prune.')


def unlearning_optimizer(learning_rate: float,
                         steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with momentum and coupled decay, the rate x0.1 from each milestone epoch on."""
  return _unlearning_optimizer(float(learning_rate), int(steps_per_epoch))


@functools.lru_cache(maxsize=None)
def _unlearning_optimizer(learning_rate: float, steps_per_epoch: int):
  schedule = optax.piecewise_constant_schedule(
      learning_rate, {epoch * steps_per_epoch: 0.1 for epoch in MILESTONES})
  return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY),
                     optax.sgd(schedule, momentum=MOMENTUM))


@functools.lru_cache(maxsize=None)
def _ascent_step(padding: int, flip: bool, padding_mode: str) -> Callable:
  """(state, images, labels, rows, key) -> (state, (loss, correct)): one step up the CE."""
  def step(state, images, labels, rows, key):
    x = pixels.to_unit_float(images[rows])
    x = train.augment(jax.random.fold_in(key, state.step), x, padding=padding, flip=flip,
                      padding_mode=padding_mode)
    y = labels[rows]

    def negative_ce(params):
      (logits, _), updates = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats}, x, train=True,
          mutable=["batch_stats"])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return -ce, (ce, jnp.sum(jnp.argmax(logits, -1) == y), updates["batch_stats"])

    (_, (ce, correct, stats)), ascent = jax.value_and_grad(negative_ce, has_aux=True)(
        state.params)
    return state.apply_gradients(grads=ascent, batch_stats=stats), (ce, correct)
  return jax.jit(step, donate_argnums=0)


def _check_finite(losses: list, what: str) -> None:
  values = np.asarray(jnp.stack(losses)) if losses else np.zeros(0)
  if not np.all(np.isfinite(values)):
    raise train.TrainingDiverged(f"RNP's {what} loss became "
                                 f"{values[~np.isfinite(values)][0]}; lower prune.rnp's rates")


def unlearn(model, variables, images: np.ndarray, labels: np.ndarray, values: Settings, *,
            augmentation: tuple[int, bool, str], key: jax.Array,
            on_epoch: Callable[[], None] | None = None) -> tuple[dict, dict]:
  """Step 1: gradient ascent on S until an epoch's accuracy is <= clean_threshold.

  Args:
    model: has `apply` (the linfjax convention: `(logits, maps)`).
    variables: the backdoored model's variables (not changed).
    images: S, uint8 [N, H, W, C]; labels: [N] int.
    values: the rates, epochs, threshold and batch size.
    augmentation: (crop padding, flip, padding mode).
    key: split into the epochs' shuffles and the steps' augmentation.
    on_epoch: called after every epoch.

  Returns:
    (the unlearned variables, {'unlearning_epochs_run', 'unlearned_accuracy_S',
     'reached_clean_threshold'}).
  """
  batch = min(values.batch_size, len(labels))
  steps = train.steps_per_epoch(len(labels), batch)
  state = train.create_state(model, jax.tree.map(jnp.array, variables),
                             unlearning_optimizer(values.unlearning_lr, steps))
  step = _ascent_step(*augmentation)
  images, labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
  shuffle_key, augment_key = jax.random.split(key)
  accuracy, epochs, losses = 1.0, 0, []
  for epoch in range(values.unlearning_epochs):
    correct = []
    for rows in np.asarray(train.epoch_batches(jax.random.fold_in(shuffle_key, epoch),
                                               len(labels), batch)):
      state, (loss, hits) = step(state, images, labels, rows, augment_key)
      losses.append(loss)
      correct.append(hits)
    _check_finite(losses, "unlearning")
    accuracy, epochs = float(np.sum(jnp.stack(correct))) / (steps * batch), epoch + 1
    if on_epoch is not None:
      on_epoch()
    if accuracy <= values.clean_threshold:
      break
  return train.variables(state), {"unlearning_epochs_run": epochs,
                                  "unlearned_accuracy_S": accuracy,
                                  "reached_clean_threshold": accuracy <= values.clean_threshold}


@functools.lru_cache(maxsize=None)
def _recovery_step(apply_fn: Callable, hyper: anp.Hyperparameters, padding_mode: str):
  optimizer = optax.sgd(hyper.learning_rate, momentum=hyper.momentum)

  def step(masks, opt_state, variables, images_uint8, labels, key):
    x = train.augment(key, pixels.to_unit_float(images_uint8), padding=hyper.padding,
                      flip=hyper.flip, padding_mode=padding_mode)
    return anp.mask_step(masks, opt_state, variables, x, labels, key, apply_fn=apply_fn,
                         settings=hyper, optimizer=optimizer)
  return jax.jit(step), optimizer


def recover(apply_fn: Callable, variables, images: np.ndarray, labels: np.ndarray,
            values: Settings, *, augmentation: tuple[int, bool, str], key: jax.Array,
            on_epoch: Callable[[], None] | None = None) -> dict[str, np.ndarray]:
  """Step 2: the masks of every batch-norm neuron of `variables` (the unlearned model),
  learned on S: {batch-norm layer: float32 [K] in [0, 1]}.

  Raises:
    ValueError: the model has no batch norm.
  """
  masks = {name: jnp.ones(size, jnp.float32) for name, size in bn.sizes(variables).items()}
  if not masks:
    raise ValueError("rnp learns masks on batch-norm neurons; this model has none")
  padding, flip, padding_mode = augmentation
  hyper = anp.Hyperparameters(eps=0.0, alpha=values.alpha, learning_rate=values.recovering_lr,
                              momentum=MOMENTUM, iterations=0, batch_size=values.batch_size,
                              padding=padding, flip=flip)
  step, optimizer = _recovery_step(apply_fn, hyper, padding_mode)
  opt_state = optimizer.init(masks)
  images, labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
  batch = min(values.batch_size, int(labels.shape[0]))
  shuffle_key, augment_key = jax.random.split(key)
  losses, count = [], 0
  for epoch in range(values.recovering_epochs):
    for rows in np.asarray(train.epoch_batches(jax.random.fold_in(shuffle_key, epoch),
                                               int(labels.shape[0]), batch)):
      masks, opt_state, loss = step(masks, opt_state, variables, images[rows], labels[rows],
                                    jax.random.fold_in(augment_key, count))
      losses.append(loss)
      count += 1
    if on_epoch is not None:
      on_epoch()
  _check_finite(losses, "mask-recovery")
  return {name: np.asarray(mask) for name, mask in masks.items()}


def prune(variables, mask_values: dict[str, np.ndarray], values: Settings) -> tuple[dict, Any]:
  """Step 3: (keep-dict, pruned variables) of the ORIGINAL model from the recovered masks."""
  written = as_written(mask_values)
  if values.pruning_by == "threshold":
    keep = keep_above(written, values.threshold)
  else:
    keep = keep_all_but_smallest(written, values.pruning_number)
  return keep, pruned_variables(variables, keep)


def _run(inputs: Inputs, values: Settings) -> Record:
  recipe = inputs.recipe
  augmentation = (int(recipe.crop_padding), bool(recipe.flip), str(recipe.padding_mode))
  unlearn_key, recover_key = jax.random.split(keys.run_key(inputs.seed, keys.RNP))
  bar = inputs.bar("prune rnp", values.unlearning_epochs + values.recovering_epochs,
                   unit="epoch")
  unlearned, details = unlearn(inputs.model, inputs.variables, inputs.images, inputs.labels,
                               values, augmentation=augmentation, key=unlearn_key,
                               on_epoch=bar.update)
  bar.update(values.unlearning_epochs - details["unlearning_epochs_run"])
  mask_values = recover(inputs.model.apply, unlearned, inputs.images, inputs.labels, values,
                        augmentation=augmentation, key=recover_key, on_epoch=bar.update)
  bar.close()
  keep, defended = prune(inputs.variables, mask_values, values)
  details.update({"chosen_on": "S", "pruning_by": values.pruning_by,
                  "recovering_epochs": values.recovering_epochs,
                  "pruned_per_layer": {name: int(np.sum(k == 0)) for name, k in keep.items()}})
  details.update({"threshold": values.threshold} if values.pruning_by == "threshold"
                 else {"pruning_number": values.pruning_number})
  return Record(pruned=num_pruned(keep), variables=defended, details=details)


RNP = Defense(
    run=_run, from_config=lambda prune_block: Settings.from_config(prune_block.rnp),
    needs_trigger=False, blocks={"rnp": Settings},
    cost=lambda work: (20 + 20) * 3.0 * work.clean_set + 2.0 * (work.clean_set + work.test),
    description="RNP: unlearn S by gradient ascent, recover batch-norm masks on S, prune the "
                "original model's neurons with the lowest masks")
