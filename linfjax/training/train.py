"""Training: one jitted, donated SGD step over a dataset that lives on the device.

The training set is uint8 on the device; each step gathers its batch by index,
augments it (random crop with padding, horizontal flip), stamps the trigger on
the examples flagged for it, and updates. An epoch is a Python loop over that one
compiled step: on XLA:CPU a `lax.scan` over training steps ran 57x slower
(docs/benchmarks.md), and on GPU it gained nothing, so the loop is the fast
choice on both. Values that vary between runs (data, trigger, seed) are arrays,
so a second run of the same shapes reuses the compiled step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from linfjax import errors, keys, models, pixels, settings
from linfjax.settings import boolean, choice, integer, number, spec
from linfjax import attacks
from linfjax.attacks import poison




# Padding before the random crop: "zeros" as torchvision's RandomCrop(32, padding=4) in
# BackdoorBench; "reflect" mirrors the border (no black frame for the model to learn).
PADDING_MODES = {"zeros": "constant", "reflect": "reflect"}
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The `train` block: BackdoorBench's recipe by default (SGD lr 0.01, momentum 0.9, weight
  decay 5e-4, batch 128, 100 epochs, cosine decay, crop with zero padding 4, flips)."""
  epochs: int = spec(100, integer(1), "Epochs of training.")
  batch_size: int = spec(128, integer(1), "Images per SGD step.")
  learning_rate: float = spec(0.01, number(0.0, 10.0, low_open=True),
                              "SGD's initial rate, decayed by a cosine to 0.")
  momentum: float = spec(0.9, number(0.0, 1.0, high_open=True), "SGD momentum.")
  nesterov: bool = spec(False, boolean(), "Nesterov momentum (BackdoorBench: plain momentum).")
  weight_decay: float = spec(5e-4, number(0.0, 1.0), "Coupled weight decay, as torch's SGD.")
  crop_padding: int = spec(4, integer(0), "Pixels of padding before the random crop.")
  padding_mode: str = spec("zeros", choice(*PADDING_MODES),
                           'Crop padding: "zeros" (torchvision\'s) or "reflect".')
  flip: bool = spec(True, boolean(), "Random horizontal flips.")
  compute_dtype: str = spec("float32", choice(*COMPUTE_DTYPES),
                            "The models' compute dtype (bfloat16 on GPUs).")
  eval_batch_size: int = spec(500, integer(1), "Images per evaluation call.")


class TrainingDiverged(errors.UserError, RuntimeError):
  """The loss became NaN or infinite."""


class TrainState(train_state.TrainState):
  batch_stats: Any = None


class DeviceData(NamedTuple):
  """A training set on the device: uint8 images, int32 labels, bool stamp flags, and bool
  noise-mode flags (WaNet's examples warped with fresh noise, labels kept)."""
  images: jax.Array
  labels: jax.Array
  stamp: jax.Array
  noise: jax.Array


def to_device(training_set: poison.PoisonedSet) -> DeviceData:
  return DeviceData(jnp.asarray(training_set.images), jnp.asarray(training_set.labels),
                    jnp.asarray(training_set.stamp_after_augmentation),
                    jnp.asarray(training_set.noise_mode))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch; the remainder is dropped (each epoch reshuffles)."""
  return num_examples // batch_size


def make_optimizer(train_config, total_steps: int) -> optax.GradientTransformation:
  """SGD with momentum (Nesterov's when `train_config.nesterov`), coupled weight decay (as
  torch.optim.SGD) and cosine decay."""
  return _optimizer(float(train_config.learning_rate), float(train_config.momentum),
                    float(train_config.weight_decay), bool(train_config.nesterov),
                    max(1, int(total_steps)))


@functools.lru_cache(maxsize=None)
def _optimizer(learning_rate: float, momentum: float, weight_decay: float, nesterov: bool,
               total_steps: int) -> optax.GradientTransformation:
  """One object per setting: the train state holds the optimizer as static data, so a
  new object for the same setting would recompile the step for every model of a grid."""
  schedule = optax.cosine_decay_schedule(learning_rate, total_steps)
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov and bool(momentum)),
  )


def create_state(model, variables, tx) -> TrainState:
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}), tx=tx)


def initial_state(model: models.LayeredClassifier, train_config, *,
                  image_shape: tuple[int, int, int], num_examples: int, seed: int) -> TrainState:
  """A run's model before its first step: weights drawn from the seed's TRAIN_INIT stream,
  and the `train` block's optimizer with its cosine decay over the whole run.

  Args:
    model: the classifier to train.
    train_config: a config's `train` block (epochs, batch size, SGD settings).
    image_shape: (H, W, C) of the training images.
    num_examples: training examples per epoch (the decay's length counts full batches).
    seed: the run's seed (linfjax/keys.py).
  """
  total_steps = train_config.epochs * steps_per_epoch(num_examples, train_config.batch_size)
  variables = models.init(model, keys.run_key(seed, keys.TRAIN_INIT), image_shape)
  return create_state(model, variables, make_optimizer(train_config, total_steps))




def augment(key: jax.Array, images: jax.Array, *, padding: int, flip: bool,
            padding_mode: str = "zeros") -> jax.Array:
  """Random crop after padding, and a random horizontal flip, per example.

  Args:
    key: PRNG key.
    images: [B, H, W, C] float.
    padding: pixels of padding on each side before cropping back to H x W.
    flip: whether to flip each image left-right with probability 1/2.
    padding_mode: a PADDING_MODES name.
  """
  batch, height, width, channels = images.shape
  crop_key, flip_key = jax.random.split(key)
  if padding:
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                     mode=PADDING_MODES[padding_mode])
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * padding + 1)
    crop = lambda image, offset: jax.lax.dynamic_slice(
        image, (offset[0], offset[1], 0), (height, width, channels))
    images = jax.vmap(crop)(padded, offsets)
  if flip:
    flips = jax.random.bernoulli(flip_key, 0.5, (batch, 1, 1, 1))
    images = jnp.where(flips, images[:, :, ::-1, :], images)
  return images


def train_step(state: TrainState, data: DeviceData, batch_indices: jax.Array,
               trigger: attacks.AnyTrigger, key: jax.Array, *, padding: int, flip: bool,
               padding_mode: str = "zeros", objective: Callable | None = None):
  """One SGD step on the examples `batch_indices` of `data`.

  The augmentation draws from `fold_in(key, state.step)`, so a resumed run repeats it;
  the noise mode's noise (WaNet) from a key folded from that one. `objective` maps the
  batch's mean cross-entropy to the loss minimised (None: the cross-entropy itself; ABL's
  flooding or gradient ascent, linfjax/training/abl.py).

  Returns:
    The new state and {'loss', 'accuracy'} of this batch (before the update; the loss is
    the cross-entropy).
  """
  images = pixels.to_unit_float(data.images[batch_indices])
  labels = data.labels[batch_indices]
  step_key = jax.random.fold_in(key, state.step)
  images = augment(step_key, images, padding=padding, flip=flip, padding_mode=padding_mode)
  stamp = data.stamp[batch_indices][:, None, None, None]
  images = jnp.where(stamp, attacks.apply(trigger, images), images)
  noise = data.noise[batch_indices][:, None, None, None]
  noisy = attacks.apply_noise_mode(trigger, images, jax.random.fold_in(step_key, keys.NOISE_MODE))
  images = jnp.where(noise, noisy, images)

  def loss_fn(params):
    (logits, _), updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    minimised = loss if objective is None else objective(loss)
    return minimised, (loss, logits, updates["batch_stats"])

  (_, (loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return state, {"loss": loss, "accuracy": accuracy}


@functools.lru_cache(maxsize=None)
def compiled_step(padding: int, flip: bool, padding_mode: str = "zeros",
                  objective: Callable | None = None) -> Callable:
  """The jitted step for one augmentation setting and objective, cached so every run
  shares it."""
  return jax.jit(functools.partial(train_step, padding=padding, flip=flip,
                                   padding_mode=padding_mode, objective=objective),
                 donate_argnums=0)


def epoch_batches(key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
  """[steps, batch_size] example indices for one epoch, freshly shuffled."""
  steps = steps_per_epoch(num_examples, batch_size)
  order = jax.random.permutation(key, num_examples)
  return order[:steps * batch_size].reshape(steps, batch_size)


def train_epoch(state: TrainState, data: DeviceData, trigger: attacks.AnyTrigger, *,
                key: jax.Array, epoch: int, batch_size: int, padding: int, flip: bool,
                padding_mode: str = "zeros", objective: Callable | None = None,
                on_step: Callable[[dict], None] | None = None) -> tuple[TrainState, dict]:
  """Runs one epoch; raises TrainingDiverged naming the first step whose loss is not finite.

  `on_step(metrics)` gets every step's {'loss', 'accuracy'} as device arrays, still being
  computed (a progress bar can wait on them: linfjax/runs/progress.py).

  The shuffle draws from `fold_in(shuffle key, epoch)` and augmentation from the step
  number, so a run resumed at an epoch boundary repeats the same batches.
  """
  step_fn = compiled_step(padding, flip, padding_mode, objective)
  shuffle_key, augment_key = jax.random.split(key)
  num_examples = data.labels.shape[0]
  batches = np.asarray(epoch_batches(jax.random.fold_in(shuffle_key, epoch), num_examples,
                                     batch_size))
  losses, accuracies = [], []
  for batch_indices in batches:
    state, metrics = step_fn(state, data, batch_indices, trigger, augment_key)
    losses.append(metrics["loss"])
    accuracies.append(metrics["accuracy"])
    if on_step is not None:
      on_step(metrics)
  losses = np.asarray(jnp.stack(losses))
  if not np.all(np.isfinite(losses)):
    bad = int(np.flatnonzero(~np.isfinite(losses))[0])
    global_step = epoch * len(batches) + bad
    raise TrainingDiverged(
        f"the training loss became {losses[bad]} at step {global_step} (epoch {epoch}); "
        "lower train.learning_rate, or check the data and trigger for NaNs")
  return state, {"loss": float(losses.mean()), "accuracy": float(np.mean(accuracies))}


@dataclasses.dataclass
class Recipe:
  """What `fit` needs from a config's `train` block."""
  epochs: int
  batch_size: int
  padding: int
  flip: bool
  padding_mode: str = "zeros"
  objective: Callable | None = None  # The batch's mean cross-entropy -> the loss minimised.

  @classmethod
  def from_config(cls, train_config) -> "Recipe":
    return cls(train_config.epochs, train_config.batch_size, train_config.crop_padding,
               bool(train_config.flip), train_config.padding_mode)


def fit(state: TrainState, data: DeviceData, trigger: attacks.AnyTrigger, recipe: Recipe, *,
        key: jax.Array, start_epoch: int = 0,
        on_epoch_end: Callable[[int, TrainState, dict], None] | None = None,
        on_step: Callable[[dict], None] | None = None) -> TrainState:
  """Trains from `start_epoch` to `recipe.epochs`, calling `on_epoch_end(epoch, state, metrics)`."""
  for epoch in range(start_epoch, recipe.epochs):
    state, metrics = train_epoch(state, data, trigger, key=key, epoch=epoch,
                                 batch_size=recipe.batch_size, padding=recipe.padding,
                                 flip=recipe.flip, padding_mode=recipe.padding_mode,
                                 objective=recipe.objective, on_step=on_step)
    if on_epoch_end is not None:
      on_epoch_end(epoch, state, metrics)
  return state


def variables(state: TrainState) -> dict:
  """The model variables of a train state, for `model.apply`."""
  return {"params": state.params, "batch_stats": state.batch_stats}
