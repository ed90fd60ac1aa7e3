"""Training several models of the same shapes in lockstep, over a mesh of devices.

The models' train states, training sets, triggers and keys are stacked on a leading
"runs" axis, `train.train_step` is vmapped over it, and that axis is sharded over a
`jax.sharding.Mesh` of the devices (no pmap): with one model per device each device
runs dense convolutions on its own model. Several models per device are batched
weights, which XLA lowers to grouped convolutions: on 2 CPU cores that ran a small CNN
at a third of the speed of training the models one after another (benchmarks/grid.py),
so a grid uses this only where it has several devices or is told to
(`config.sweep.models_per_device`).

Each model draws its shuffles and augmentations from its own key exactly as
`train.fit` does, so a model trained here matches the one trained alone up to
floating-point reassociation.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from linfjax.training import train
from linfjax import attacks

RUNS_AXIS = "runs"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh ("runs") over `devices` (default: this process's devices).

  On several hosts each process meshes its own devices and takes its own shard of the
  grid's runs (linfjax/runs/sweep.py): runs never exchange data, so no cross-host mesh or
  collective is needed, and each process writes only its own run directories.
  """
  devices = jax.local_devices() if devices is None else list(devices)
  return Mesh(np.array(devices), (RUNS_AXIS,))


@functools.lru_cache(maxsize=None)
def compiled_step(padding: int, flip: bool, padding_mode: str = "zeros") -> Callable:
  """`train.train_step` vmapped over the runs axis, jitted once per augmentation setting."""
  step = jax.vmap(functools.partial(train.train_step, padding=padding, flip=flip,
                                    padding_mode=padding_mode))
  return jax.jit(step, donate_argnums=0)


def _stack(trees: Sequence, sharding: NamedSharding):
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
  return jax.device_put(stacked, sharding)


def _unstack(tree, count: int) -> list:
  return [jax.tree.map(lambda leaf, i=i: leaf[i], tree) for i in range(count)]


def fit(states: Sequence[train.TrainState], datasets: Sequence[train.DeviceData],
        trigger_list: Sequence[attacks.Trigger], keys: Sequence[jax.Array],
        recipe: train.Recipe, *, mesh: Mesh, start_epoch: int = 0,
        on_epoch_end: Callable[[int, list, list], None] | None = None,
        on_step: Callable[[], None] | None = None) -> list[train.TrainState]:
  """Trains every model from `start_epoch` to `recipe.epochs` together.

  Args:
    states, datasets, trigger_list, keys: one per model; the states share their model
      and optimizer objects, and the datasets their shapes.
    recipe: epochs, batch size and augmentation, shared.
    mesh: the runs axis is sharded over it; the model count is padded up to a multiple
      of its size with copies of the last model (their results are dropped).
    start_epoch: epochs already done by every model.
    on_epoch_end: called with (epoch, [state per model], [metrics per model]).
    on_step: called after every step.

  Returns:
    The final state of each model.

  Raises:
    train.TrainingDiverged: naming the model and step whose loss is not finite.
  """
  count = len(states)
  padded = -count % mesh.devices.size
  pad = lambda items: list(items) + [items[-1]] * padded
  sharding = NamedSharding(mesh, PartitionSpec(RUNS_AXIS))
  state = _stack(pad(states), sharding)
  data = _stack(pad(datasets), sharding)
  trigger = _stack(pad(trigger_list), sharding)
  keys = pad(keys)
  shuffle_keys, augment_keys = zip(*(jax.random.split(key) for key in keys))
  augment_keys = _stack(augment_keys, sharding)
  num_examples = datasets[0].labels.shape[0]
  step_fn = compiled_step(recipe.padding, recipe.flip, recipe.padding_mode)
  for epoch in range(start_epoch, recipe.epochs):
    batches = np.stack([np.asarray(train.epoch_batches(jax.random.fold_in(key, epoch),
                                                       num_examples, recipe.batch_size))
                        for key in shuffle_keys], axis=1)  # [steps, models, batch]
    losses, accuracies = [], []
    for batch_indices in batches:
      state, step_metrics = step_fn(state, data, jax.device_put(batch_indices, sharding),
                                    trigger, augment_keys)
      losses.append(step_metrics["loss"])
      accuracies.append(step_metrics["accuracy"])
      if on_step is not None:
        on_step()
    losses = np.asarray(jnp.stack(losses))[:, :count]
    accuracies = np.asarray(jnp.stack(accuracies))[:, :count]
    if not np.all(np.isfinite(losses)):
      bad_step, model = (int(v) for v in np.argwhere(~np.isfinite(losses))[0])
      raise train.TrainingDiverged(
          f"model {model} of {count}: the training loss became {losses[bad_step, model]} at "
          f"step {epoch * len(batches) + bad_step} (epoch {epoch}); lower "
          "train.learning_rate, or check the data and trigger for NaNs")
    if on_epoch_end is not None:
      epoch_metrics = [{"loss": float(losses[:, m].mean()), "accuracy": float(accuracies[:, m].mean())}
                       for m in range(count)]
      on_epoch_end(epoch, _unstack(state, count), epoch_metrics)
  return _unstack(state, count)
