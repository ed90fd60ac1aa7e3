"""Fine-tuning a pruned model on the defender's clean set S, with its pruning mask fixed.

The mask is an input of the model (`models.py`), so fine-tuning applies it in every
forward pass: the pruned channels of layer `L` stay exactly zero while the remaining
weights adapt, and the gradient reaching the pruned channels' weights is zero (only
weight decay moves them, and their output is masked anyway). This is the second half
of Fine-Pruning and the optional last step of the lp-based defense.

`tune` is the one loop every tuning on S uses (this one, FT-SAM, NAD, SAU): the caller gives
the step's loss and gradient. The step mirrors `linfjax.training.train`'s: SGD with momentum, coupled weight decay and cosine
decay (`train.make_optimizer`), random crop and flip (`train.augment`), batch norm in
training mode, a Python loop over one jitted, donated step.

References:
  Liu et al., "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
  Networks", RAID 2018.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from linfjax import models
from linfjax import pixels
from linfjax.training import train


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How to fine-tune: epochs over S, SGD settings, augmentation."""
  epochs: int
  learning_rate: float
  momentum: float
  weight_decay: float
  batch_size: int
  padding: int
  flip: bool
  padding_mode: str = "zeros"
  nesterov: bool = False


def cross_entropy(state: train.TrainState, x: jax.Array, y: jax.Array, masks=None):
  """params -> (the batch's cross-entropy, new batch stats), batch norm in training mode and
  the channel `masks` (layer name -> [K]) applied."""
  def loss_fn(params):
    (logits, _), updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                          x, masks, train=True, mutable=["batch_stats"])
    return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
            updates["batch_stats"])
  return loss_fn


def masked_cross_entropy_step(state: train.TrainState, x: jax.Array, y: jax.Array, masks):
  """The step loss of plain fine-tuning: cross-entropy with the pruning `masks` fixed."""
  (loss, batch_stats), grads = jax.value_and_grad(cross_entropy(state, x, y, masks),
                                                  has_aux=True)(state.params)
  return loss, batch_stats, grads


@functools.lru_cache(maxsize=None)
def compiled_step(step_loss: Callable, padding: int, flip: bool,
                  padding_mode: str = "zeros") -> Callable:
  """One jitted, donated step on rows of S: augment, then `step_loss`'s gradient applied."""
  def step(state, images, labels, rows, key, extra):
    x = train.augment(jax.random.fold_in(key, state.step), pixels.to_unit_float(images[rows]),
                      padding=padding, flip=flip, padding_mode=padding_mode)
    loss, batch_stats, grads = step_loss(state, x, labels[rows], extra)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss
  return jax.jit(step, donate_argnums=0)


def tune(model: models.LayeredClassifier, variables, images: np.ndarray, labels: np.ndarray,
         recipe: Recipe, step_loss: Callable, *, key: jax.Array, extra=None) -> dict:
  """Tunes a model on S with the caller's step loss; returns its new variables.

  Args:
    model: the classifier.
    variables: its variables ({'params', 'batch_stats'}); not modified.
    images: S, uint8 [N, H, W, C]; labels: [N] int.
    recipe: epochs, SGD and augmentation settings; the batch is at most N.
    step_loss: (state, x, y, extra) -> (loss, batch_stats, grads) for one batch (x: augmented
      images in [0, 1]); one function object per setting, so each compiles once.
    key: PRNG key; epoch `e` shuffles with `fold_in(key, e)`.
    extra: a pytree passed to `step_loss` (the pruning masks, a teacher's variables).

  Raises:
    train.TrainingDiverged: when the loss is not finite.
  """
  batch_size = min(recipe.batch_size, len(labels))
  steps = train.steps_per_epoch(len(labels), batch_size)
  tx = train.make_optimizer(recipe, recipe.epochs * steps)
  copy = jax.tree.map(jnp.array, variables)  # The step donates its state.
  state = train.create_state(model, copy, tx)
  step_fn = compiled_step(step_loss, recipe.padding, recipe.flip, recipe.padding_mode)
  images, labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
  shuffle_key, augment_key = jax.random.split(key)
  losses = []
  for epoch in range(recipe.epochs):
    order = np.asarray(train.epoch_batches(jax.random.fold_in(shuffle_key, epoch), len(labels),
                                           batch_size))
    for rows in order:
      state, loss = step_fn(state, images, labels, rows, augment_key, extra)
      losses.append(loss)
  losses = np.asarray(jnp.stack(losses))
  if not np.all(np.isfinite(losses)):
    bad = int(np.flatnonzero(~np.isfinite(losses))[0])
    raise train.TrainingDiverged(
        f"the fine-tuning loss became {losses[bad]} at step {bad}; lower "
        "prune.fine_tune.learning_rate")
  return train.variables(state)


def fine_tune(model: models.LayeredClassifier, variables, images: np.ndarray,
              labels: np.ndarray, mask_dict: Mapping[str, np.ndarray], recipe: Recipe, *,
              key: jax.Array) -> dict:
  """Fine-tunes a masked model on S (cross-entropy, `mask_dict`: layer name -> [K] mask in
  {0, 1}, fixed); returns its new variables. See `tune`."""
  masks = {layer: jnp.asarray(mask, jnp.float32) for layer, mask in mask_dict.items()}
  return tune(model, variables, images, labels, recipe, masked_cross_entropy_step, key=key,
              extra=masks)
