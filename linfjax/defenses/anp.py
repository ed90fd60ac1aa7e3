"""Adversarial Neuron Pruning (ANP): masks on batch-norm neurons learned on S, pruned below a threshold.

Every batch-norm neuron `k` gets a mask `m_k` in [0, 1] (initially 1) and, in the
perturbed model, multiplicative noise on its scale and bias:
`gamma_k * (m_k + delta_k)` and `beta_k * (1 + xi_k)`.
For each mini-batch of the defender's clean set S:
  1. draw `delta, xi` uniformly in [-eps, eps] and take `steps` signed gradient steps of
     size `eps / steps` that increase the cross-entropy (not clipped, as both references:
     from a uniform start one step reaches up to 2 eps; `clip_noise=True` clips back to
     [-eps, eps], the constraint the paper states);
  2. update the masks by SGD with momentum 0.9 on
     `alpha * CE(masks, no noise) + (1 - alpha) * CE(masks, delta, xi)`, then clip them to
     [0, 1].
Batch norm runs in training mode (batch statistics); the updated running statistics are
thrown away, as both references prune a fresh copy of the model. Neurons whose mask ends at
or below a threshold (or the `pruning_number` smallest) are pruned by zeroing their batch-norm
scale, the bias kept. No test data enters; the trigger only with `selection="sweep"`.

Where it follows which reference (checked against the authors' github.com/csdongxian/
ANP_backdoor optimize_mask_cifar.py, prune_neuron_cifar.py and models/anp_batchnorm.py at
ec7b179, and BackdoorBench's defense/anp.py with config/defense/anp/config.yaml at f02e353):
  - The mask learning (both the same code): eps 0.4, steps 1, alpha 0.2, momentum 0.9,
    2000 iterations of batches drawn with replacement, random crop (pad 4) and flip, noise
    moved by SGD at lr eps / steps on the gradient's sign, never clipped. Both write the
    mask values to mask_values.txt with '{:.4f}' and prune from that file, so linfjax rounds
    them to `decimals` 4 before pruning (a mask of 0.20004 is then pruned at 0.2).
  - The `prune.anp` defaults are the authors': mask lr 0.2 and batch 128
    (optimize_mask_cifar.py; on `--val-frac 0.01`, 500 CIFAR-10 images). BackdoorBench's
    config uses lr 0.01, batch 256 and `ratio` 0.05 (5 % of the training set; in linfjax
    the size of S is `data.clean_set_size`, not an ANP field).
  - Pruning: both prune neurons by mask value, `<= threshold` (`pruning_by="threshold"`)
    or the smallest `pruning_number` (`"number"`). The authors' prune_neuron_cifar.py only prints
    the test numbers of every threshold 0, 0.05, ..., 0.9; `selection="fixed"` (default)
    prunes at `threshold` 0.2, the paper's. BackdoorBench (`selection="sweep"`) walks the
    same thresholds (`pruning_max` 0.9, `pruning_step` 0.05; for "number", counts
    `start + ceil(step)` for `start` in `range(0, ceil(max) + 1, ceil(step))`) and keeps the
    level of lowest ASR, below the unpruned model's, among those whose clean accuracy moved
    by less than `acc_ratio` 0.1 relatively (else the unpruned model). BackdoorBench measures
    that on the test split under the real trigger; linfjax on S under the defender's trigger.

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
from linfjax.defenses.anp_pruning import (THRESHOLD, as_written, choose_level, keep_above,
                                          keep_all_but_smallest, num_pruned, pruned_variables,
                                          sweep_levels)
from linfjax.defenses.base import Defense, Inputs, Record
from linfjax.settings import boolean, choice, integer, number, spec
from linfjax.training import train

Masks = Mapping[str, jax.Array]
PRUNING_BY = ("threshold", "number")
SELECTIONS = ("fixed", "sweep")


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
  clip_noise: bool = False


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


def adversarial_noise(masks: Masks, variables, images: jax.Array, labels: jax.Array,
                      key: jax.Array, *, apply_fn: Callable,
                      settings: Hyperparameters) -> tuple[dict, dict]:
  """Step 1 of a mask update: `delta, xi` drawn uniformly in [-eps, eps], then `steps`
  signed steps of `eps / steps` up the cross-entropy (clipped to [-eps, eps] only with
  `settings.clip_noise`). Returns ({layer: [K]} scale noise, bias noise)."""
  eps = settings.eps
  noise = initial_noise(key, masks, eps)
  loss = lambda scales, biases: _cross_entropy(
      perturbed_variables(variables, masks, scales, biases), images, labels, apply_fn=apply_fn)
  for _ in range(settings.steps):
    grads = jax.grad(loss, argnums=(0, 1))(*noise)
    moved = (jax.tree.map(lambda n, g: n + eps / settings.steps * jnp.sign(g), part, grad)
             for part, grad in zip(noise, grads))
    noise = tuple(jax.tree.map(lambda n: jnp.clip(n, -eps, eps), part)
                  if settings.clip_noise else part for part in moved)
  return noise


def mask_step(masks: Masks, opt_state, variables, images: jax.Array, labels: jax.Array,
              key: jax.Array, *, apply_fn: Callable, settings: Hyperparameters,
              optimizer: optax.GradientTransformation):
  """One ANP update of the masks on one batch.

  Args:
    masks: {batch-norm layer: [K]} in [0, 1].
    opt_state: the mask optimizer's state.
    variables: the backdoored model's variables (not changed).
    images: [B, H, W, C] float in [0, 1] (augmented already); labels: [B] int.
    key: draws the initial noise.
    apply_fn: `model.apply`.
    settings: eps, steps, alpha, clip_noise.
    optimizer: SGD with momentum on the masks.

  Returns:
    (new masks clipped to [0, 1], new optimizer state, the loss before the update).
  """
  ce = functools.partial(_cross_entropy, images=images, labels=labels, apply_fn=apply_fn)
  noise = None
  if settings.eps > 0:
    noise = adversarial_noise(masks, variables, images, labels, key, apply_fn=apply_fn,
                              settings=settings)

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


@dataclasses.dataclass(frozen=True)
class Settings(settings_lib.Settings):
  """The `prune.anp` block (defaults: the authors'; BackdoorBench's in the meanings)."""
  eps: float = spec(0.4, number(0.0, 10.0), "Noise bound (both references' 0.4).")
  steps: int = spec(1, integer(1), "Signed noise steps per batch (both: 1).")
  alpha: float = spec(0.2, number(0.0, 1.0), "Weight of the noiseless loss (both: 0.2).")
  learning_rate: float = spec(0.2, number(0.0, 10.0, low_open=True),
                              "Mask SGD rate (the authors' 0.2; BackdoorBench's 0.01).")
  batch_size: int = spec(128, integer(1), "Images per update (the authors' 128; BackdoorBench's "
                         "256).")
  iterations: int = spec(2000, integer(1), "ANP's mask updates on S (both: 2000).")
  clip_noise: bool = spec(False, boolean(), "Clip the noise to [-eps, eps] after its steps "
                          "(the paper's constraint; neither reference clips).")
  decimals: int = spec(4, integer(0), "Mask values rounded to this many decimals before "
                       "pruning (both prune from a file written with '{:.4f}').")
  pruning_by: str = spec("threshold", choice(*PRUNING_BY),
                         '"threshold": mask value <= threshold; "number": the smallest ones.')
  threshold: float = spec(THRESHOLD, number(0.0, 1.0),
                          "fixed selection: prune masks at or below this (the paper's 0.2).")
  pruning_number: int = spec(0, integer(0),
                             'fixed selection with pruning_by="number": how many to prune.')
  selection: str = spec("fixed", choice(*SELECTIONS),
                        '"fixed": at threshold/number; "sweep": BackdoorBench\'s choice over '
                        "levels on S (lowest defender ASR within acc_ratio).")
  pruning_max: float = spec(0.9, number(0.0, 1e9),
                            "sweep: the last threshold (or count) (both: 0.9).")
  pruning_step: float = spec(0.05, number(0.0, 1e9, low_open=True),
                             "sweep: the step of thresholds (or counts) (both: 0.05).")
  acc_ratio: float = spec(0.1, number(0.0, 1.0, low_open=True),
                          "sweep: largest relative CA change on S (BackdoorBench's 0.1).")


def _sweep(inputs: Inputs, values: Settings, mask_values) -> tuple[dict, dict]:
  """BackdoorBench's selection on S: (the chosen keep-dict, details)."""
  levels, keeps = sweep_levels(mask_values, pruning_by=values.pruning_by,
                               pruning_max=values.pruning_max, pruning_step=values.pruning_step)
  ones = {inputs.layer: np.ones((1, inputs.neurons(inputs.layer)), np.float32)}
  numbers = [inputs.clean_set_sweep(ones, mask_batch=1, desc="prune anp sweep",
                                    variables=None if keep is None else
                                    pruned_variables(inputs.variables, keep))
             for keep in [None, *keeps]]
  ca = [float(n["CA_S"][0]) for n in numbers]
  asr = [float(n["ASR_defender"][0]) for n in numbers]
  chosen = choose_level(ca[1:], asr[1:], ca_reference=ca[0], asr_reference=asr[0],
                        acc_ratio=values.acc_ratio)
  keep = keeps[chosen] if chosen >= 0 else {name: np.ones_like(v, np.float32)
                                            for name, v in mask_values.items()}
  return keep, {"levels": np.asarray(levels).tolist(), "CA_S": ca[1:], "ASR_defender": asr[1:],
                "CA_S_unpruned": ca[0], "ASR_defender_unpruned": asr[0],
                "chosen_level": chosen, "acc_ratio": values.acc_ratio}


def _run(inputs: Inputs, values: Settings) -> Record:
  recipe = inputs.recipe
  hyperparameters = Hyperparameters(
      eps=values.eps, steps=values.steps, alpha=values.alpha,
      learning_rate=values.learning_rate, iterations=values.iterations,
      batch_size=values.batch_size, padding=recipe.crop_padding, flip=bool(recipe.flip),
      clip_noise=values.clip_noise)
  bar = inputs.bar("prune anp", hyperparameters.iterations, unit="update")
  mask_values = learn_masks(inputs.model.apply, inputs.variables, inputs.images, inputs.labels,
                            settings=hyperparameters, key=keys.run_key(inputs.seed, keys.ANP),
                            on_update=lambda loss: bar.update(1, result=loss))
  bar.close()
  mask_values = as_written(mask_values, values.decimals)
  details = {"iterations": values.iterations, "pruning_by": values.pruning_by,
             "selection": values.selection, "clip_noise": values.clip_noise, "chosen_on": "S"}
  if values.selection == "sweep":
    keep, swept = _sweep(inputs, values, mask_values)
    details.update(swept)
  elif values.pruning_by == "threshold":
    keep = keep_above(mask_values, values.threshold)
    details["threshold"] = values.threshold
  else:
    keep = keep_all_but_smallest(mask_values, values.pruning_number)
    details["pruning_number"] = values.pruning_number
  return Record(pruned=num_pruned(keep), variables=pruned_variables(inputs.variables, keep),
                details=details)


ANP = Defense(run=_run, from_config=lambda prune: Settings.from_config(prune.anp),
              needs_trigger=False, blocks={"anp": Settings},
              cost=lambda work: 200 * 128 * 6.0 + 2.0 * (work.clean_set + work.test),
              description="ANP: batch-norm masks learned against weight noise on S, pruned "
                          "below a threshold (the trigger only with selection='sweep')")
