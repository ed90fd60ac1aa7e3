"""FT-SAM: fine-tuning on S with Sharpness-Aware Minimisation.

Each step perturbs the weights towards higher loss, `e = rho * g / ||g||` (g: the batch's
gradient, ||.|| the global L2 norm over all parameters), takes the gradient at `w + e`, and
steps the original weights `w` with it (SGD with the fine-tuning recipe's momentum, coupled
decay and cosine schedule). The idea: minima the backdoor lives in are sharp, so a flat
minimum of the clean loss forgets it.

Follows Zhu et al., "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware
Minimization", ICCV 2023, as BackdoorBench's defense/ft-sam.py (SCLBD/BackdoorBench at
f02e353; not checked line by line here): fine-tuning on the clean data with a SAM
optimizer wrapping SGD.
Differences: the plain (non-adaptive) SAM perturbation, `rho` default 0.05 (Foret et al.'s;
BackdoorBench's config sets its own rho, and the paper's adaptive variant scales `e` by |w|);
batch-norm statistics are updated from the first (unperturbed) pass only; epochs, rate and
batch are `prune.fine_tune`'s (BackdoorBench: 100 epochs at lr 0.01 on 5 % of the training
set), so the quick setting tunes for that block's epochs.

`tune_on_s` is the loop this module and NAD (nad.py) share: a jitted, donated step over S
with augmentation; the step's loss is the caller's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from linfjax import keys, pixels
from linfjax import settings as settings_lib
from linfjax.defenses import fine_tuning
from linfjax.defenses.base import Defense, Inputs, Record
from linfjax.settings import number, spec
from linfjax.training import finetune, train


@dataclasses.dataclass(frozen=True)
class Settings(settings_lib.Settings):
  """The `prune.ft_sam` block (its epochs, rate and batch: `prune.fine_tune`'s)."""
  rho: float = spec(0.05, number(0.0, 10.0, low_open=True),
                    "SAM's radius: the weights move rho * g / ||g|| before the gradient.")


def sam_gradient(loss_fn: Callable, params, rho: float):
  """SAM's gradient: `loss_fn`'s gradient at `params + rho * g / ||g||`, g at `params`.

  `loss_fn(params) -> (loss, aux)`; returns (loss at params, aux at params, the gradient)."""
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  norm = optax.tree.norm(grads)
  scale = rho / (norm + 1e-12)
  perturbed = jax.tree.map(lambda w, g: w + scale * g, params, grads)
  (_, _), sharp = jax.value_and_grad(loss_fn, has_aux=True)(perturbed)
  return loss, aux, sharp


def tune_on_s(inputs: Inputs, recipe: finetune.Recipe, step_loss: Callable, *, salt: int,
              extra=None) -> dict:
  """Fine-tunes the inputs' model on S; returns its new variables.

  step_loss(state, x, y, extra) -> (loss, batch_stats, grads): one batch's loss and gradient
  (x: augmented images in [0, 1]); `extra` is passed through (a pytree, e.g. a teacher).

  Raises:
    train.TrainingDiverged: when the loss is not finite.
  """
  batch_size = min(recipe.batch_size, len(inputs.labels))
  steps = train.steps_per_epoch(len(inputs.labels), batch_size)
  state = train.create_state(inputs.model, jax.tree.map(jnp.array, inputs.variables),
                             train.make_optimizer(recipe, recipe.epochs * steps))
  step = _compiled(step_loss, recipe.padding, recipe.flip, recipe.padding_mode)
  images, labels = jnp.asarray(inputs.images), jnp.asarray(inputs.labels, jnp.int32)
  shuffle_key, augment_key = jax.random.split(keys.run_key(inputs.seed, salt))
  losses = []
  for epoch in range(recipe.epochs):
    for rows in np.asarray(train.epoch_batches(jax.random.fold_in(shuffle_key, epoch),
                                               len(labels), batch_size)):
      state, loss = step(state, images, labels, rows, augment_key, extra)
      losses.append(loss)
  losses = np.asarray(jnp.stack(losses))
  if not np.all(np.isfinite(losses)):
    raise train.TrainingDiverged(f"the loss on S became {losses[~np.isfinite(losses)][0]}; "
                                 "lower prune.fine_tune.learning_rate")
  return train.variables(state)


@functools.lru_cache(maxsize=None)
def _compiled(step_loss: Callable, padding: int, flip: bool, padding_mode: str) -> Callable:
  def step(state, images, labels, rows, key, extra):
    x = train.augment(jax.random.fold_in(key, state.step), pixels.to_unit_float(images[rows]),
                      padding=padding, flip=flip, padding_mode=padding_mode)
    loss, batch_stats, grads = step_loss(state, x, labels[rows], extra)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss
  return jax.jit(step, donate_argnums=0)


def cross_entropy(state, x, y):
  """params -> (the batch's cross-entropy, new batch stats), batch norm in training mode."""
  def loss_fn(params):
    (logits, _), updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                          x, train=True, mutable=["batch_stats"])
    return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
            updates["batch_stats"])
  return loss_fn


@functools.lru_cache(maxsize=None)
def sam_step(rho: float) -> Callable:
  """The step_loss of `tune_on_s` for SAM with radius rho (one object per rho: one compile)."""
  def step_loss(state, x, y, extra):
    del extra
    loss, batch_stats, grads = sam_gradient(cross_entropy(state, x, y), state.params, rho)
    return loss, batch_stats, grads
  return step_loss


def _run(inputs: Inputs, both) -> Record:
  values, tuning = both
  defended = tune_on_s(inputs, fine_tuning.recipe(inputs, tuning), sam_step(values.rho),
                       salt=keys.FT_SAM)
  return Record(pruned=0, variables=defended,
                details={"chosen_on": "S", "rho": values.rho, "epochs": tuning.epochs})


FT_SAM = Defense(
    run=_run, needs_trigger=False,
    from_config=lambda prune: (Settings.from_config(prune.ft_sam),
                               fine_tuning.Settings.from_config(prune.fine_tune)),
    cost=lambda work: 2 * fine_tuning.tuning_cost(work),
    blocks={"ft_sam": Settings, "fine_tune": fine_tuning.Settings},
    description="FT-SAM: fine-tuning on S with sharpness-aware minimisation (two passes a step)")
