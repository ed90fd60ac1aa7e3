"""ABL, anti-backdoor learning: a training-time defense that trains its own model.

On the backdoored model's (poisoned) training set, a fresh model:
  1. isolation: trains `isolation_epochs` with an ascent objective on the batch's mean
     cross-entropy `L`, so that examples learnt too fast stay learnt and the others do not
     sink below the level `gamma`: flooding `|L - gamma| + gamma` (BackdoorBench's default)
     or LGA `sign(L - gamma) * L` (the paper's);
  2. picks the `isolation_ratio` of the training examples with the lowest loss (no
     augmentation, triggers stamped as training stamps them): the backdoor is learnt fastest,
     so these are mostly poisoned;
  3. trains `finetuning_epochs` more on the other examples (cross-entropy; the rate drops
     tenfold after two thirds of them, as the reference's 40 of 60);
  4. unlearns: `unlearning_epochs` of gradient ascent (minimising `-L`) on the isolated
     examples at `unlearning_rate`.
The run's train stage trains it when `abl.enabled` (linfjax/runs/stages/train.py), beside
the backdoored and vanilla models, and reports its CA / ASR / RA, DER against the backdoored
model, and how many of the isolated examples are poisoned.

Follows Li et al., "Anti-Backdoor Learning: Training Clean Models on Poisoned Data", NeurIPS
2021, as BackdoorBench runs it (defense/abl.py and config/defense/abl/cifar10.yaml,
SCLBD/BackdoorBench at f02e353): 20 isolation epochs at lr 0.01 with flooding 0.5, 1 %
isolated, 60 fine-tuning epochs (lr 0.01, then 0.001 from epoch 40), 20 unlearning epochs
(BackdoorBench's schedule sets 1e-4 every epoch, overriding its lr_unlearning_init 5e-4),
SGD with Nesterov momentum 0.9 and weight decay 1e-4. Differences: each phase (and each
rate of fine-tuning) starts a fresh momentum, where the reference carries one SGD's buffer
from fine-tuning into unlearning; the losses of step 2 are computed in batches, not one image
at a time (the same numbers); batch and augmentation are the run's `train` block's, so the
quick variant's mirrored padding applies; one checkpoint at the end (a killed ABL model
trains again from its start).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from linfjax import attacks, keys, models, pixels, settings
from linfjax.settings import boolean, choice, integer, number, spec
from linfjax.training import train

ASCENTS = ("flooding", "lga")


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The `abl` block (BackdoorBench's defaults)."""
  enabled: bool = spec(False, boolean(),
                       "Train a third model with ABL on the poisoned training set (train stage).")
  isolation_epochs: int = spec(20, integer(1), "Epochs of training with the ascent objective.")
  ascent: str = spec("flooding", choice(*ASCENTS),
                     'The isolation objective: "flooding" |L - gamma| + gamma (BackdoorBench) or '
                     '"lga" sign(L - gamma) L (the paper).')
  gamma: float = spec(0.5, number(0.0, 100.0, low_open=True),
                      "The loss level the ascent objective holds the batch at.")
  isolation_ratio: float = spec(0.01, number(0.0, 1.0, low_open=True, high_open=True),
                                "Share of the training examples isolated (lowest loss).")
  learning_rate: float = spec(0.01, number(0.0, 10.0, low_open=True),
                              "SGD's rate for isolation and fine-tuning.")
  finetuning_epochs: int = spec(60, integer(0),
                                "Epochs on the examples not isolated (rate / 10 for the last third).")
  unlearning_epochs: int = spec(20, integer(1),
                                "Epochs of gradient ascent on the isolated examples.")
  unlearning_rate: float = spec(1e-4, number(0.0, 10.0, low_open=True),
                                "SGD's rate for unlearning.")
  momentum: float = spec(0.9, number(0.0, 1.0, high_open=True), "SGD's Nesterov momentum.")
  weight_decay: float = spec(1e-4, number(0.0, 1.0), "Coupled weight decay.")


def flooding(gamma: float) -> Callable:
  return lambda loss: jnp.abs(loss - gamma) + gamma


def lga(gamma: float) -> Callable:
  return lambda loss: jnp.sign(loss - gamma) * loss


def negated(loss):
  return -loss


@functools.lru_cache(maxsize=None)
def objective(ascent: str, gamma: float) -> Callable:
  """The isolation objective (one object per setting, so the step compiles once)."""
  return {"flooding": flooding, "lga": lga}[ascent](gamma)


@functools.lru_cache(maxsize=None)
def _sgd(learning_rate: float, momentum: float, weight_decay: float):
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum or None,
                               nesterov=bool(momentum)))


def _subset(data: train.DeviceData, rows: np.ndarray) -> train.DeviceData:
  return train.DeviceData(*(field[rows] for field in data))


def example_losses(model: models.LayeredClassifier, variables, data: train.DeviceData,
                   trigger, *, key: jax.Array, batch_size: int) -> np.ndarray:
  """Each training example's cross-entropy as training presents it, without augmentation:
  [N] float32 (flagged examples stamped, noise-mode ones warped with noise from `key`)."""
  @jax.jit
  def losses(rows):
    images = pixels.to_unit_float(data.images[rows])
    flags = data.stamp[rows][:, None, None, None]
    images = jnp.where(flags, attacks.apply(trigger, images), images)
    noisy = attacks.apply_noise_mode(trigger, images, key)
    images = jnp.where(data.noise[rows][:, None, None, None], noisy, images)
    logits, _ = model.apply(variables, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, data.labels[rows])

  count = data.labels.shape[0]
  return np.concatenate([np.asarray(losses(jnp.arange(start, min(start + batch_size, count))))
                         for start in range(0, count, batch_size)])


def isolated_count(num_examples: int, ratio: float) -> int:
  """`int(N * ratio)`, at least one: how many examples ABL isolates."""
  return max(1, int(num_examples * ratio))


def isolate(losses: np.ndarray, ratio: float) -> np.ndarray:
  """The `isolated_count` examples with the lowest loss, as sorted indices."""
  return np.sort(np.argsort(losses, kind="stable")[:isolated_count(len(losses), ratio)])


def _phase(state, data, trigger, recipe: train.Recipe, learning_rate: float, values: Settings,
           key: jax.Array, objective_fn=None):
  state = state.replace(tx=_sgd(learning_rate, values.momentum, values.weight_decay))
  state = state.replace(opt_state=state.tx.init(state.params))
  batch = min(recipe.batch_size, data.labels.shape[0])
  phase = dataclasses.replace(recipe, batch_size=batch, objective=objective_fn)
  return train.fit(state, data, trigger, phase, key=key)


def anti_backdoor_learning(model: models.LayeredClassifier, data: train.DeviceData, trigger,
                           recipe: train.Recipe, values: Settings, *,
                           image_shape: tuple[int, int, int], seed: int,
                           on_phase: Callable[[str], None] = lambda name: None):
  """Trains a model with ABL on `data` (the poisoned training set on the device).

  `recipe` gives the batch and augmentation (its epochs are ignored). Returns the model's
  variables and the isolated examples' indices into `data`.

  Raises:
    train.TrainingDiverged: when a phase's loss is not finite.
  """
  init_key, isolation_key, loss_key, tune_key, unlearn_key = jax.random.split(
      keys.run_key(seed, keys.ABL), 5)
  variables = models.init(model, init_key, image_shape)
  state = train.create_state(model, variables, _sgd(values.learning_rate, values.momentum,
                                                    values.weight_decay))
  on_phase("isolation")
  state = _phase(state, data, trigger, dataclasses.replace(recipe, epochs=values.isolation_epochs),
                 values.learning_rate, values, isolation_key,
                 objective(values.ascent, values.gamma))
  losses = example_losses(model, train.variables(state), data, trigger, key=loss_key,
                          batch_size=max(recipe.batch_size, 256))
  isolated = isolate(losses, values.isolation_ratio)
  others = np.setdiff1d(np.arange(len(losses)), isolated)
  on_phase("fine-tuning")
  high = -(-2 * values.finetuning_epochs // 3)  # Two thirds, rounded up (40 of 60).
  for epochs, rate, salt in ((high, values.learning_rate, 0),
                             (values.finetuning_epochs - high, values.learning_rate / 10, 1)):
    if epochs:
      state = _phase(state, _subset(data, others), trigger,
                     dataclasses.replace(recipe, epochs=epochs), rate, values,
                     jax.random.fold_in(tune_key, salt))
  on_phase("unlearning")
  state = _phase(state, _subset(data, isolated), trigger,
                 dataclasses.replace(recipe, epochs=values.unlearning_epochs),
                 values.unlearning_rate, values, unlearn_key, negated)
  return train.variables(state), isolated
