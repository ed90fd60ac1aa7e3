"""Adversarial Neuron Pruning (ANP): masks on batch-norm neurons learned on S, pruned below a threshold.

Every batch-norm neuron `k` gets a mask `m_k` in [0, 1] (initially 1) and, in the
perturbed model, multiplicative noise on its scale and bias:
`gamma_k * (m_k + delta_k)` and `beta_k * (1 + xi_k)`, with `delta, xi` in [-eps, eps].
For each mini-batch of the defender's clean set S:
  1. draw `delta, xi` uniformly in [-eps, eps] and take `steps` signed gradient steps of
     size `eps / steps` that increase the cross-entropy (clipped back to [-eps, eps]);
  2. update the masks by SGD with momentum on
     `alpha * CE(masks, no noise) + (1 - alpha) * CE(masks, delta, xi)`, then clip them to
     [0, 1].
Batch norm runs in training mode (batch statistics), as in the authors' code; the updated
running statistics are thrown away. Neurons whose mask ends at or below a threshold (or
the `count` smallest) are pruned by zeroing their batch-norm scale; the bias stays, as
the authors' pruning does. No test data and no trigger enter.

The defaults are the authors' (their code and BackdoorBench's config/defense/anp): eps
0.4, one step, alpha 0.2, mask SGD lr 0.2 with momentum 0.9, 2000 iterations of 128
images drawn with replacement, random crop (pad 4) and flip, pruning threshold 0.2.
One difference: the noise is clipped to [-eps, eps] after its step, the constraint the
paper states; the authors' code does not clip, so from a uniform start its noise reaches
2 eps.

References:
  Wu and Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from linfjax import keys, settings as settings_lib
from linfjax.defenses import bn
from linfjax.defenses.base import Defense, Inputs, Record
from linfjax.settings import integer, number, spec
from linfjax.training import train

Masks = Mapping[str, jax.Array]
THRESHOLD = 0.2  # ANP's pruning threshold on the mask values.


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
  """How ANP learns its masks (the authors' defaults)."""
  eps: float = 0.4
  steps: int = 1
  alpha: float = 0.2
  learning_rate: float = 0.2
  momentum: float = 0.9
  iterations: int = 2000
  batch_size: int = 128
  padding: int = 4
  flip: bool = True


def perturbed_variables(variables, masks: Masks, noise_scale: Masks | None = None,
                        noise_bias: Masks | None = None) -> dict:
  """Variables with every batch-norm scale `gamma * (m + delta)` and bias `beta * (1 + xi)`.

  Without noise, the scales are `gamma * m` and the biases unchanged.
  """
  if noise_scale is None:
    return bn.rescale(variables, masks)
  return bn.rescale(variables, {name: masks[name] + noise_scale[name] for name in masks},
                    {name: 1.0 + noise_bias[name] for name in masks})


def initial_noise(key: jax.Array, masks: Masks, eps: float) -> tuple[dict, dict]:
  """`delta, xi` drawn uniformly in [-eps, eps], one [K] array per layer and per kind."""
  scale_noise, bias_noise = {}, {}
  for index, (name, mask) in enumerate(sorted(masks.items())):
    scale_key, bias_key = jax.random.split(jax.random.fold_in(key, index))
    scale_noise[name] = jax.random.uniform(scale_key, mask.shape, minval=-eps, maxval=eps)
    bias_noise[name] = jax.random.uniform(bias_key, mask.shape, minval=-eps, maxval=eps)
  return scale_noise, bias_noise


def _cross_entropy(variables, images, labels, *, apply_fn):
  (logits, _), _ = apply_fn(variables, images, train=True, mutable=["batch_stats"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def mask_step(masks: Masks, opt_state, variables, images: jax.Array, labels: jax.Array,
              key: jax.Array, *, apply_fn: Callable, settings: Settings,
              optimizer: optax.GradientTransformation):
  """One ANP update of the masks on one batch.

  Args:
    masks: {batch-norm layer: [K]} in [0, 1].
    opt_state: the mask optimizer's state.
    variables: the backdoored model's variables (not changed).
    images: [B, H, W, C] float in [0, 1] (augmented already); labels: [B] int.
    key: draws the initial noise.
    apply_fn: `model.apply`.
    settings: eps, steps, alpha.
    optimizer: SGD with momentum on the masks.

  Returns:
    (new masks clipped to [0, 1], new optimizer state, the loss before the update).
  """
  ce = functools.partial(_cross_entropy, images=images, labels=labels, apply_fn=apply_fn)
  eps = settings.eps
  noise = None
  if eps > 0:
    noise = initial_noise(key, masks, eps)
    noise_loss = lambda scales, biases: ce(perturbed_variables(variables, masks, scales, biases))
    for _ in range(settings.steps):
      grads = jax.grad(noise_loss, argnums=(0, 1))(*noise)
      noise = tuple(jax.tree.map(lambda n, g: jnp.clip(n + eps / settings.steps * jnp.sign(g),
                                                       -eps, eps), part, grad)
                    for part, grad in zip(noise, grads))

  def mask_loss(current):
    natural = ce(perturbed_variables(variables, current))
    if noise is None:
      return settings.alpha * natural
    return settings.alpha * natural + (1 - settings.alpha) * ce(
        perturbed_variables(variables, current, *noise))

  loss, grads = jax.value_and_grad(mask_loss)(dict(masks))
  updates, opt_state = optimizer.update(grads, opt_state, dict(masks))
  new_masks = jax.tree.map(lambda m: jnp.clip(m, 0.0, 1.0), optax.apply_updates(dict(masks), updates))
  return new_masks, opt_state, loss


@functools.lru_cache(maxsize=None)
def _optimizer(learning_rate: float, momentum: float) -> optax.GradientTransformation:
  return optax.sgd(learning_rate, momentum=momentum or None)


@functools.lru_cache(maxsize=None)
def _compiled_step(apply_fn: Callable, settings: Hyperparameters) -> Callable:
  """The jitted update for one model and setting; augmentation happens inside."""
  optimizer = _optimizer(settings.learning_rate, settings.momentum)

  def step(masks, opt_state, variables, images_uint8, labels, key):
    augment_key, noise_key = jax.random.split(key)
    x = train.augment(augment_key, images_uint8.astype(jnp.float32) / 255.0,
                      padding=settings.padding, flip=settings.flip)
    return mask_step(masks, opt_state, variables, x, labels, noise_key, apply_fn=apply_fn,
                     settings=settings, optimizer=optimizer)

  return jax.jit(step)


def learn_masks(apply_fn: Callable, variables, images: np.ndarray, labels: np.ndarray, *,
                settings: Hyperparameters = Hyperparameters(), key: jax.Array,
                on_update: Callable[[jax.Array], None] | None = None) -> dict[str, np.ndarray]:
  """ANP's mask values of every batch-norm neuron, learned on S.

  Args:
    apply_fn: the backdoored model's `model.apply`.
    variables: its variables.
    images: S, uint8 [N, H, W, C]; labels: [N] int.
    settings: ANP's hyperparameters.
    key: batch `i` is drawn (with replacement, as the authors' sampler) and augmented
      with `fold_in(key, i)`.
    on_update: called after each update is dispatched with its loss (a device array), so a
      progress bar can count the update once that loss is ready.

  Returns:
    {batch-norm layer: float32 [K] in [0, 1]}.

  Raises:
    ValueError: the model has no batch norm, or the loss became non-finite.
  """
  masks = {name: jnp.ones(size, jnp.float32) for name, size in bn.sizes(variables).items()}
  if not masks:
    raise ValueError("ANP needs batch-norm layers; this model's variables have none")
  step = _compiled_step(apply_fn, settings)
  opt_state = _optimizer(settings.learning_rate, settings.momentum).init(masks)
  images, labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
  batch = min(settings.batch_size, int(labels.shape[0]))
  losses = []
  for i in range(settings.iterations):
    batch_key = jax.random.fold_in(key, i)
    rows = jax.random.randint(jax.random.fold_in(batch_key, 0), (batch,), 0, labels.shape[0])
    masks, opt_state, loss = step(masks, opt_state, variables, images[rows], labels[rows],
                                  jax.random.fold_in(batch_key, 1))
    losses.append(loss)
    if on_update is not None:
      on_update(loss)
  losses = np.asarray(jnp.stack(losses)) if losses else np.zeros(0)
  if not np.all(np.isfinite(losses)):
    raise ValueError(f"ANP's loss became {losses[~np.isfinite(losses)][0]} at iteration "
                     f"{int(np.flatnonzero(~np.isfinite(losses))[0])}; lower its learning rate")
  return {name: np.asarray(mask) for name, mask in masks.items()}


def keep_above(values: Mapping[str, np.ndarray], threshold: float = THRESHOLD) -> dict:
  """Pruning by threshold: {layer: float32 [K]}, 0 where the mask value is <= threshold."""
  return {name: (np.asarray(v) > threshold).astype(np.float32) for name, v in values.items()}


def keep_all_but_smallest(values: Mapping[str, np.ndarray], count: int) -> dict:
  """Pruning by count: 0 for the `count` smallest mask values over all layers (ties in layer,
  then neuron order), 1 elsewhere."""
  names = list(values)
  flat = np.concatenate([np.asarray(values[name], np.float64) for name in names])
  if not 0 <= count <= flat.size:
    raise ValueError(f"cannot prune {count} of {flat.size} batch-norm neurons")
  keep = np.ones(flat.size, np.float32)
  keep[np.argsort(flat, kind="stable")[:count]] = 0.0
  splits = np.cumsum([np.asarray(values[name]).size for name in names])[:-1]
  return dict(zip(names, np.split(keep, splits)))


def pruned_variables(variables, keep: Mapping[str, np.ndarray]) -> dict:
  """ANP's pruning: the batch-norm scale of every pruned neuron set to 0, its bias kept."""
  return bn.rescale(variables, {name: jnp.asarray(k) for name, k in keep.items()})


def num_pruned(keep: Mapping[str, np.ndarray]) -> int:
  """How many neurons a keep-dict prunes."""
  return int(sum(np.sum(np.asarray(k) == 0) for k in keep.values()))


@dataclasses.dataclass(frozen=True)
class Settings(settings_lib.Settings):
  """The `prune.anp` block."""
  iterations: int = spec(2000, integer(1), "ANP's mask updates on S (the authors' 2000).")
  threshold: float = spec(THRESHOLD, number(0.0, 1.0),
                          "ANP prunes neurons whose mask ends at or below this.")


def _run(inputs: Inputs, values: Settings) -> Record:
  recipe = inputs.recipe
  hyperparameters = Hyperparameters(iterations=values.iterations, padding=recipe.crop_padding,
                                    flip=bool(recipe.flip))
  bar = inputs.bar("prune anp", hyperparameters.iterations, unit="update")
  mask_values = learn_masks(inputs.model.apply, inputs.variables, inputs.images, inputs.labels,
                            settings=hyperparameters, key=keys.run_key(inputs.seed, keys.ANP),
                            on_update=lambda loss: bar.update(1, result=loss))
  bar.close()
  keep = keep_above(mask_values, values.threshold)
  return Record(pruned=num_pruned(keep), variables=pruned_variables(inputs.variables, keep),
                details={"threshold": values.threshold, "iterations": values.iterations,
                         "chosen_on": "S"})


ANP = Defense(run=_run, from_config=lambda prune: Settings.from_config(prune.anp),
              needs_trigger=False, blocks={"anp": Settings},
              cost=lambda work: 200 * 128 * 6.0 + 2.0 * (work.clean_set + work.test),
              description="ANP: batch-norm masks learned against weight noise on S, pruned "
                          "below a threshold")
