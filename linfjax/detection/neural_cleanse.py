"""Neural Cleanse reverse engineering: a synthetic trigger for every class in one solve.

For each candidate class `c` a mask `m_c = tanh(theta_m) / 2 + 0.5` [H, W] and a pattern
`p_c = tanh(theta_p) / 2 + 0.5` [H, W, C] (Neural Cleanse's parametrisation, so its
learning rate means the same here) minimise, on the defender's clean set S,

    mean_x CE(f((1 - m_c) * x + m_c * p_c), c) + lambda_c * ||m_c||_1,

and the stamped image is `attacks.apply(Trigger(m_c[..., None], p_c), x)`, so a
recovered trigger is an ordinary mask-and-pattern `Trigger`. All classes are solved
at once: `jax.vmap` over the per-class state with the model's weights and the batch
shared, which keeps the convolutions dense (the vmap that pays, docs/benchmarks.md).

A *step* (NC's term) is `mini_batches` Adam updates followed by the adaptive-cost
bookkeeping of `linfjax.detection.nc_schedule`, per class inside the one vmapped solve. The
step's attack success is either the mean over its mini-batches (NC, `success_images=0`) or,
ours, a forward-only pass of the current trigger over a fixed set of `success_images` images
of S: judged on a few dozen training images, a 99 % threshold fails a step for one or two
images and divides the cost by 2.8 (the multiplier 2 to the power 1.5). Patiences are given
in Adam updates and counted in steps, so a schedule means the same whatever the step size.

The steps are a Python loop over one jitted update (on XLA:CPU a `lax.scan` over gradient
steps through convolutions is many times slower, docs/benchmarks.md), so a caller can
checkpoint after any step; batches are drawn from `fold_in(key, epoch)` shuffles of S,
so a run resumed at a step repeats the same batches. Which class is an outlier is
`linfjax.detection.outliers`' business.

References:
  Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
  Networks", IEEE S&P 2019 (and its code, github.com/bolunwang/backdoor).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from linfjax import attacks, errors, pixels
from linfjax.detection import nc_schedule
from linfjax.detection.nc_schedule import Settings

# NC draws the initial mask and pattern uniformly in [0, 1]; ours: kept inside
# [0.01, 0.99] so that their logits are finite.
INIT_MARGIN = 0.01


class ReverseDiverged(errors.UserError, RuntimeError):
  """The reverse-engineering loss became NaN or infinite."""


class ClassState(NamedTuple):
  """One class's optimisation and schedule state; a solve stacks it on a class axis.

  `success_sum`, `l1_sum`, `loss_sum` accumulate over the current step's mini-batches.
  """
  theta_mask: jax.Array  # [H, W] mask logits.
  theta_pattern: jax.Array  # [H, W, C] pattern logits.
  opt_state: optax.OptState
  schedule: nc_schedule.ScheduleState
  success_sum: jax.Array
  l1_sum: jax.Array
  loss_sum: jax.Array


class Reversed(NamedTuple):
  """A solve's outcome per class: masks [K, H, W], patterns [K, H, W, C], norms [K].

  `succeeded[c]`: some step reached the attack-success threshold (else the mask and
  pattern are the last ones, not the best).
  """
  masks: np.ndarray
  patterns: np.ndarray
  mask_l1: np.ndarray
  succeeded: np.ndarray

  def trigger(self, target: int) -> attacks.Trigger:
    """Class `target`'s synthetic trigger: mask [H, W, 1] and pattern [H, W, C]."""
    return attacks.Trigger(jnp.asarray(self.masks[target][..., None]),
                            jnp.asarray(self.patterns[target]))


def to_unit(theta: jax.Array) -> jax.Array:
  """NC's map from logits to [0, 1]: `tanh(theta) / 2 + 0.5`."""
  return jnp.tanh(theta) / 2 + 0.5


def from_unit(values: jax.Array) -> jax.Array:
  """The inverse of `to_unit`, for values strictly inside (0, 1)."""
  return jnp.arctanh(2 * values - 1)


def optimizer(settings: Settings) -> optax.GradientTransformation:
  """Adam with Neural Cleanse's betas (0.5, 0.9)."""
  return optax.adam(settings.learning_rate, b1=0.5, b2=0.9)


def _init_class(key: jax.Array, image_shape, settings: Settings) -> ClassState:
  height, width, channels = image_shape
  mask_key, pattern_key = jax.random.split(key)
  uniform = functools.partial(jax.random.uniform, minval=INIT_MARGIN, maxval=1 - INIT_MARGIN)
  theta_mask = from_unit(uniform(mask_key, (height, width)))
  theta_pattern = from_unit(uniform(pattern_key, (height, width, channels)))
  zero = jnp.float32(0)
  return ClassState(
      theta_mask=theta_mask, theta_pattern=theta_pattern,
      opt_state=optimizer(settings).init((theta_mask, theta_pattern)),
      schedule=nc_schedule.init(settings.schedule, to_unit(theta_mask), to_unit(theta_pattern)),
      success_sum=zero, l1_sum=zero, loss_sum=zero)


@functools.partial(jax.jit, static_argnames=("image_shape", "num_classes", "settings"))
def init(key: jax.Array, image_shape: tuple[int, int, int], num_classes: int,
         settings: Settings) -> ClassState:
  """Every class's initial state, stacked: leaves [K, ...]; class c draws from fold_in(key, c)."""
  keys = jax.vmap(functools.partial(jax.random.fold_in, key))(jnp.arange(num_classes))
  return jax.vmap(functools.partial(_init_class, image_shape=image_shape,
                                    settings=settings))(keys)


def _stamp(state: ClassState, images: jax.Array) -> jax.Array:
  """uint8 images [B, H, W, C] with the class's current trigger, floats in [0, 1]."""
  trigger = attacks.Trigger(to_unit(state.theta_mask)[..., None], to_unit(state.theta_pattern))
  return attacks.apply(trigger, pixels.to_unit_float(images))


def update(state: ClassState, variables, images: jax.Array, batch_indices: jax.Array,
           target: jax.Array, *, apply_fn: Callable, settings: Settings) -> ClassState:
  """One Adam update of one class's mask and pattern on a batch of S.

  Args:
    state: the class's state (unstacked).
    variables: the model's variables, for `apply_fn(variables, images)`.
    images: S, uint8 [N, H, W, C].
    batch_indices: int [B], the batch's rows of `images`.
    target: int scalar, the class the trigger should flip images to.
    apply_fn: the model's `apply`, returning `(logits [B, K], activations)`.
    settings: the hyperparameters.

  Returns:
    The updated state; a stopped class's mask, pattern and optimizer state are unchanged.
  """
  batch = images[batch_indices]
  chex.assert_rank(batch, 4)
  labels = jnp.full(batch.shape[:1], target, jnp.int32)

  def loss_fn(thetas):
    stamped = _stamp(state._replace(theta_mask=thetas[0], theta_pattern=thetas[1]), batch)
    logits, _ = apply_fn(variables, stamped)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    l1 = jnp.sum(to_unit(thetas[0]))
    success = jnp.mean(jnp.argmax(logits, -1) == labels)
    return cross_entropy + state.schedule.cost * l1, (success, l1)

  thetas = (state.theta_mask, state.theta_pattern)
  (loss, (success, l1)), grads = jax.value_and_grad(loss_fn, has_aux=True)(thetas)
  updates, opt_state = optimizer(settings).update(grads, state.opt_state, thetas)
  new_thetas = optax.apply_updates(thetas, updates)
  keep = lambda old, new: jnp.where(state.schedule.stopped, old, new)
  new_thetas, opt_state = jax.tree.map(keep, (thetas, state.opt_state), (new_thetas, opt_state))
  return state._replace(
      theta_mask=new_thetas[0], theta_pattern=new_thetas[1], opt_state=opt_state,
      success_sum=state.success_sum + success, l1_sum=state.l1_sum + l1,
      loss_sum=state.loss_sum + loss)


def end_step(state: ClassState, variables, check_images: jax.Array, target: jax.Array, *,
             apply_fn: Callable, settings: Settings) -> tuple[ClassState, dict]:
  """The step's attack success and mask norm, then Neural Cleanse's schedule.

  Args:
    state: the class's state after the step's updates.
    variables, apply_fn: the model.
    check_images: uint8 [N, H, W, C], the fixed images of S the current trigger is judged
      on (forward only) when `settings.success_images` > 0; else unused.
    target: int scalar, the class.
    settings: the hyperparameters.

  Returns:
    The new state (accumulators reset) and the step's {'success', 'l1', 'loss'}: the
    success and norm the schedule judged, and the mean loss over the mini-batches.
  """
  mask, pattern = to_unit(state.theta_mask), to_unit(state.theta_pattern)
  if settings.success_images:
    logits, _ = apply_fn(variables, _stamp(state, check_images))
    success = jnp.mean(jnp.argmax(logits, -1) == target)
    l1 = jnp.sum(mask)
  else:
    success = state.success_sum / settings.mini_batches
    l1 = state.l1_sum / settings.mini_batches
  schedule = nc_schedule.after_step(state.schedule, settings.schedule, success=success, l1=l1,
                                    mask=mask, pattern=pattern)
  zero = jnp.float32(0)
  new = state._replace(schedule=schedule, success_sum=zero, l1_sum=zero, loss_sum=zero)
  return new, {"success": success, "l1": l1, "loss": state.loss_sum / settings.mini_batches}


@functools.lru_cache(maxsize=None)
def compiled(apply_fn: Callable, settings: Settings, vmapped: bool) -> tuple[Callable, Callable]:
  """The jitted (update, end_step) pair: over all classes at once, or for one class.

  Vmapped, the state and targets carry a leading class axis and the model's variables
  and the images are shared.
  """
  step = functools.partial(update, apply_fn=apply_fn, settings=settings)
  finish = functools.partial(end_step, apply_fn=apply_fn, settings=settings)
  if vmapped:
    step = jax.vmap(step, in_axes=(0, None, None, None, 0))
    finish = jax.vmap(finish, in_axes=(0, None, None, 0))
  return jax.jit(step, donate_argnums=0), jax.jit(finish, donate_argnums=0)


class BatchOrder:
  """The rows of S for every Adam update: shuffled epochs of full batches, from a key."""

  def __init__(self, key: jax.Array, num_examples: int, batch_size: int):
    if not 0 < batch_size <= num_examples:
      raise ValueError(f"batch size {batch_size} must be in [1, {num_examples}] (the size of S)")
    self._key, self._num, self._batch = key, num_examples, batch_size
    self._per_epoch = num_examples // batch_size
    self._epoch, self._order = -1, None

  def __call__(self, index: int) -> np.ndarray:
    """int32 [batch_size], the batch of Adam update `index` (counted from the start)."""
    epoch, position = divmod(index, self._per_epoch)
    if epoch != self._epoch:
      order = jax.random.permutation(jax.random.fold_in(self._key, epoch), self._num)
      self._epoch, self._order = epoch, np.asarray(order, np.int32)
    return self._order[position * self._batch:(position + 1) * self._batch]


def check_images(images: jax.Array, key: jax.Array, settings: Settings) -> jax.Array:
  """The fixed images of S each step's success is judged on: `success_images` of them,
  drawn with `key` (all of S when it has fewer); empty when success is NC's batch mean."""
  count = min(settings.success_images, images.shape[0])
  rows = jax.random.permutation(key, images.shape[0])[:count]
  return images[jnp.sort(rows)]


def _optimise(step_fns, state: ClassState, variables, images, targets, *, key: jax.Array,
              settings: Settings, start_step: int,
              on_step: Callable[[int, ClassState, dict], None] | None) -> ClassState:
  update_fn, end_fn = step_fns
  order = BatchOrder(jax.random.fold_in(key, 0), images.shape[0], settings.batch_size)
  checked = check_images(images, jax.random.fold_in(key, 1), settings)
  for step in range(start_step, settings.steps):
    if bool(np.all(np.asarray(state.schedule.stopped))):
      break
    for i in range(settings.mini_batches):
      state = update_fn(state, variables, images, order(step * settings.mini_batches + i),
                        targets)
    state, means = end_fn(state, variables, checked, targets)
    loss = np.asarray(means["loss"])
    if not np.all(np.isfinite(loss)):
      raise ReverseDiverged(f"the reverse-engineering loss became {loss} at step {step}; "
                            "lower reverse.learning_rate or reverse.init_cost")
    if on_step is not None:
      on_step(step + 1, state, means)
  return state


def solve(apply_fn: Callable, variables, images: ArrayLike, *, num_classes: int, key: jax.Array,
          settings: Settings, state: ClassState | None = None, start_step: int = 0,
          on_step: Callable[[int, ClassState, dict], None] | None = None) -> ClassState:
  """Reverse engineers a trigger for every class in one vmapped solve.

  Args:
    apply_fn: the model's `apply`; `apply_fn(variables, x)` returns `(logits, activations)`.
    variables: the model's variables (shared by all classes).
    images: S, uint8 [N, H, W, C].
    num_classes: K; class c is solved for target c.
    key: PRNG key; `fold_in(key, 0)` draws the initial masks and patterns,
      `fold_in(key, 1)` the batches and the images success is judged on.
    settings: the hyperparameters.
    state: a state to resume from (a checkpoint taken after step `start_step`).
    start_step: the number of steps `state` has run.
    on_step: called as `on_step(steps_done, state, means)` after every step, where means
      holds the step's per-class [K] 'success', 'l1' and 'loss'.

  Returns:
    The final state, leaves [K, ...]; `result` turns it into masks and patterns.
  """
  images = jnp.asarray(images)
  chex.assert_rank(images, 4)
  if state is None:
    state = init(jax.random.fold_in(key, 0), tuple(images.shape[1:]), num_classes, settings)
  return _optimise(compiled(apply_fn, settings, True), state, variables, images,
                   jnp.arange(num_classes), key=jax.random.fold_in(key, 1), settings=settings,
                   start_step=start_step, on_step=on_step)


def solve_per_class(apply_fn: Callable, variables, images: ArrayLike, *, num_classes: int,
                    key: jax.Array, settings: Settings) -> ClassState:
  """`solve` with the classes one at a time: the same math, seeds and batches.

  The reference for `solve` (tests) and its baseline (benchmarks/reverse.py).
  """
  images = jnp.asarray(images)
  chex.assert_rank(images, 4)
  stacked = init(jax.random.fold_in(key, 0), tuple(images.shape[1:]), num_classes, settings)
  step_fns = compiled(apply_fn, settings, False)
  finals = []
  for target in range(num_classes):
    state = jax.tree.map(lambda leaf: leaf[target], stacked)
    finals.append(_optimise(step_fns, state, variables, images, jnp.int32(target),
                            key=jax.random.fold_in(key, 1), settings=settings, start_step=0,
                            on_step=None))
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *finals)


def result(state: ClassState) -> Reversed:
  """Each class's best mask and pattern (its last ones if it never succeeded)."""
  to_unit_np = lambda theta: np.tanh(np.asarray(theta, np.float64)) / 2 + 0.5
  schedule = state.schedule
  succeeded = np.isfinite(np.asarray(schedule.best_l1))
  masks = np.where(succeeded[:, None, None], np.asarray(schedule.best_mask),
                   to_unit_np(state.theta_mask))
  patterns = np.where(succeeded[:, None, None, None], np.asarray(schedule.best_pattern),
                      to_unit_np(state.theta_pattern))
  masks, patterns = masks.astype(np.float32), patterns.astype(np.float32)
  return Reversed(masks, patterns, masks.sum(axis=(1, 2)), succeeded)
