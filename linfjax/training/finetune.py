"""Fine-tuning a pruned model on the defender's clean set S, with its pruning mask fixed.

The mask is an input of the model (`models.py`), so fine-tuning applies it in every
forward pass: the pruned channels of layer `L` stay exactly zero while the remaining
weights adapt, and the gradient reaching the pruned channels' weights is zero (only
weight decay moves them, and their output is masked anyway). This is the second half
of Fine-Pruning and the optional last step of the lp-based defense.

The step mirrors `linfjax.training.train`'s: SGD with momentum, coupled weight decay and cosine
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


def masked_step(state: train.TrainState, images: jax.Array, labels: jax.Array,
                batch_indices: jax.Array, mask_dict: Mapping[str, jax.Array], key: jax.Array,
                *, padding: int, flip: bool, padding_mode: str = "zeros"):
  """One SGD step on rows `batch_indices` of S with the channel masks applied.

  Args:
    state: the train state (params, batch_stats, optimizer).
    images: S, uint8 [N, H, W, C]; labels: int32 [N].
    batch_indices: int [B].
    mask_dict: layer name -> [K] mask, applied in the forward pass.
    key: PRNG key; augmentation draws from `fold_in(key, state.step)`.
    padding, flip: the augmentation.

  Returns:
    The new state and the batch's loss (before the update).
  """
  x = pixels.to_unit_float(images[batch_indices])
  y = labels[batch_indices]
  x = train.augment(jax.random.fold_in(key, state.step), x, padding=padding, flip=flip,
                    padding_mode=padding_mode)

  def loss_fn(params):
    (logits, _), updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, x, mask_dict, train=True,
        mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss


@functools.lru_cache(maxsize=None)
def compiled_step(padding: int, flip: bool, padding_mode: str = "zeros") -> Callable:
  return jax.jit(functools.partial(masked_step, padding=padding, flip=flip,
                                   padding_mode=padding_mode), donate_argnums=0)


def fine_tune(model: models.LayeredClassifier, variables, images: np.ndarray,
              labels: np.ndarray, mask_dict: Mapping[str, np.ndarray], recipe: Recipe, *,
              key: jax.Array) -> dict:
  """Fine-tunes a masked model on S; returns its new variables.

  Args:
    model: the classifier.
    variables: its variables ({'params', 'batch_stats'}); not modified.
    images: S, uint8 [N, H, W, C]; labels: [N] int.
    mask_dict: layer name -> [K] mask in {0, 1}, fixed during fine-tuning.
    recipe: epochs, SGD and augmentation settings; the batch is at most N.
    key: PRNG key; epoch `e` shuffles with `fold_in(key, e)`.

  Raises:
    train.TrainingDiverged: when the loss is not finite.
  """
  batch_size = min(recipe.batch_size, len(labels))
  steps = train.steps_per_epoch(len(labels), batch_size)
  tx = train.make_optimizer(recipe, recipe.epochs * steps)
  copy = jax.tree.map(jnp.array, variables)  # The step donates its state.
  state = train.create_state(model, copy, tx)
  step_fn = compiled_step(recipe.padding, recipe.flip, recipe.padding_mode)
  images, labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
  mask_dict = {layer: jnp.asarray(mask, jnp.float32) for layer, mask in mask_dict.items()}
  shuffle_key, augment_key = jax.random.split(key)
  losses = []
  for epoch in range(recipe.epochs):
    order = np.asarray(train.epoch_batches(jax.random.fold_in(shuffle_key, epoch), len(labels),
                                           batch_size))
    for batch_indices in order:
      state, loss = step_fn(state, images, labels, batch_indices, mask_dict, augment_key)
      losses.append(loss)
  losses = np.asarray(jnp.stack(losses))
  if not np.all(np.isfinite(losses)):
    bad = int(np.flatnonzero(~np.isfinite(losses))[0])
    raise train.TrainingDiverged(
        f"the fine-tuning loss became {losses[bad]} at step {bad}; lower "
        "prune.fine_tune.learning_rate")
  return train.variables(state)
