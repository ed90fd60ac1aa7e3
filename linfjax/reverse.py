"""Neural Cleanse reverse engineering: a synthetic trigger for every class in one solve.

For each candidate class `c` a mask `m_c = sigmoid(theta_m)` [H, W] and a pattern
`p_c = sigmoid(theta_p)` [H, W, C] minimise, on the defender's clean set S,

    mean_x CE(f((1 - m_c) * x + m_c * p_c), c) + lambda_c * ||m_c||_1,

and the stamped image is `triggers.apply(Trigger(m_c[..., None], p_c), x)`, so a
recovered trigger is an ordinary mask-and-pattern `Trigger`. All classes are solved
at once: `jax.vmap` over the per-class state with the model's weights and the batch
shared, which keeps the convolutions dense (the vmap that pays, ../shared/FINDINGS.md).

The weight `lambda_c` follows Neural Cleanse's adaptive schedule, per class and inside
the one vmapped solve. A *step* (NC's term) is `mini_batches` Adam updates; after each
step, with `s` the step's mean attack success and `n` its mean mask norm:
  - the best result so far is kept when `s >= threshold` and `n` is below the best norm;
  - the cost starts at 0 and is set to `init_cost` once `s >= threshold` for `patience`
    steps in a row (the up/down flags reset then);
  - then `patience` successful steps in a row multiply the cost by `cost_multiplier`,
    `patience` failing steps divide it by `cost_multiplier ** 1.5`;
  - a class stops early once its cost has gone both up and down and its best norm has not
    dropped below `early_stop_threshold` times its earlier best for `early_stop_patience`
    steps. A stopped class keeps its state (its updates are masked out).
A class that never succeeded reports its last mask and pattern.

The steps are a Python loop over one jitted update (on XLA:CPU a `lax.scan` over
gradient steps through convolutions is many times slower, FINDINGS.md), so a caller can
checkpoint after any step; batches are drawn from `fold_in(key, epoch)` shuffles of S,
so a run resumed at a step repeats the same batches.

References:
  Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
  Networks", IEEE S&P 2019 (and its code, github.com/bolunwang/backdoor).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from linfjax import errors, triggers

# Median absolute deviation to standard deviation, for normally distributed norms.
MAD_CONSISTENCY = 1.4826
# NC draws the initial mask and pattern uniformly in [0, 1]; ours: kept inside
# [0.01, 0.99] so that their logits are finite.
INIT_MARGIN = 0.01


class ReverseDiverged(errors.UserError, RuntimeError):
  """The reverse-engineering loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """Neural Cleanse's hyperparameters (a config's `reverse` block)."""
  steps: int
  mini_batches: int
  batch_size: int
  learning_rate: float
  init_cost: float
  cost_multiplier: float
  patience: int
  attack_success_threshold: float
  early_stop_threshold: float
  early_stop_patience: int

  @classmethod
  def from_config(cls, reverse_config) -> "Settings":
    return cls(**{field.name: reverse_config[field.name] for field in dataclasses.fields(cls)})


class ClassState(NamedTuple):
  """One class's optimisation and schedule state; a solve stacks it on a class axis.

  Counters are int32, flags bool, norms float32 (`best_l1` is inf until a step succeeds).
  `success_sum`, `l1_sum`, `loss_sum` accumulate over the current step's mini-batches.
  """
  theta_mask: jax.Array  # [H, W] mask logits.
  theta_pattern: jax.Array  # [H, W, C] pattern logits.
  opt_state: optax.OptState
  cost: jax.Array
  cost_set_count: jax.Array
  cost_up_count: jax.Array
  cost_down_count: jax.Array
  cost_went_up: jax.Array
  cost_went_down: jax.Array
  best_mask: jax.Array  # [H, W]
  best_pattern: jax.Array  # [H, W, C]
  best_l1: jax.Array
  early_stop_count: jax.Array
  early_stop_best: jax.Array
  stopped: jax.Array
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

  def trigger(self, target: int) -> triggers.Trigger:
    """Class `target`'s synthetic trigger: mask [H, W, 1] and pattern [H, W, C]."""
    return triggers.Trigger(jnp.asarray(self.masks[target][..., None]),
                            jnp.asarray(self.patterns[target]))


def optimizer(settings: Settings) -> optax.GradientTransformation:
  """Adam with Neural Cleanse's betas (0.5, 0.9)."""
  return optax.adam(settings.learning_rate, b1=0.5, b2=0.9)


def _init_class(key: jax.Array, image_shape, tx: optax.GradientTransformation) -> ClassState:
  height, width, channels = image_shape
  mask_key, pattern_key = jax.random.split(key)
  uniform = functools.partial(jax.random.uniform, minval=INIT_MARGIN, maxval=1 - INIT_MARGIN)
  theta_mask = jax.scipy.special.logit(uniform(mask_key, (height, width)))
  theta_pattern = jax.scipy.special.logit(uniform(pattern_key, (height, width, channels)))
  zero, int_zero, false = jnp.float32(0), jnp.int32(0), jnp.bool_(False)
  return ClassState(
      theta_mask=theta_mask, theta_pattern=theta_pattern,
      opt_state=tx.init((theta_mask, theta_pattern)), cost=zero,
      cost_set_count=int_zero, cost_up_count=int_zero, cost_down_count=int_zero,
      cost_went_up=false, cost_went_down=false,
      best_mask=jax.nn.sigmoid(theta_mask), best_pattern=jax.nn.sigmoid(theta_pattern),
      best_l1=jnp.float32(jnp.inf), early_stop_count=int_zero,
      early_stop_best=jnp.float32(jnp.inf), stopped=false,
      success_sum=zero, l1_sum=zero, loss_sum=zero)


@functools.partial(jax.jit, static_argnames=("image_shape", "num_classes", "settings"))
def init(key: jax.Array, image_shape: tuple[int, int, int], num_classes: int,
         settings: Settings) -> ClassState:
  """Every class's initial state, stacked: leaves [K, ...]; class c draws from fold_in(key, c)."""
  keys = jax.vmap(functools.partial(jax.random.fold_in, key))(jnp.arange(num_classes))
  return jax.vmap(functools.partial(_init_class, image_shape=image_shape,
                                    tx=optimizer(settings)))(keys)


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
  batch = images[batch_indices].astype(jnp.float32) / 255.0
  chex.assert_rank(batch, 4)
  labels = jnp.full(batch.shape[:1], target, jnp.int32)

  def loss_fn(thetas):
    mask, pattern = jax.nn.sigmoid(thetas[0]), jax.nn.sigmoid(thetas[1])
    logits, _ = apply_fn(variables, triggers.apply(triggers.Trigger(mask[..., None], pattern),
                                                   batch))
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    l1 = jnp.sum(mask)
    success = jnp.mean(jnp.argmax(logits, -1) == labels)
    return cross_entropy + state.cost * l1, (success, l1)

  thetas = (state.theta_mask, state.theta_pattern)
  (loss, (success, l1)), grads = jax.value_and_grad(loss_fn, has_aux=True)(thetas)
  updates, opt_state = optimizer(settings).update(grads, state.opt_state, thetas)
  new_thetas = optax.apply_updates(thetas, updates)
  keep = lambda old, new: jnp.where(state.stopped, old, new)
  new_thetas, opt_state = jax.tree.map(keep, (thetas, state.opt_state), (new_thetas, opt_state))
  return state._replace(
      theta_mask=new_thetas[0], theta_pattern=new_thetas[1], opt_state=opt_state,
      success_sum=state.success_sum + success, l1_sum=state.l1_sum + l1,
      loss_sum=state.loss_sum + loss)


def end_step(state: ClassState, *, settings: Settings) -> tuple[ClassState, dict]:
  """Neural Cleanse's bookkeeping after a step: best result, early stop, cost schedule.

  Returns:
    The new state (accumulators reset; a stopped class's schedule frozen) and the step's
    means {'success', 'l1', 'loss'} over its mini-batches.
  """
  s = settings
  success = state.success_sum / s.mini_batches
  l1 = state.l1_sum / s.mini_batches
  means = {"success": success, "l1": l1, "loss": state.loss_sum / s.mini_batches}
  succeeded = success >= s.attack_success_threshold

  better = succeeded & (l1 < state.best_l1)
  best_mask = jnp.where(better, jax.nn.sigmoid(state.theta_mask), state.best_mask)
  best_pattern = jnp.where(better, jax.nn.sigmoid(state.theta_pattern), state.best_pattern)
  best_l1 = jnp.where(better, l1, state.best_l1)

  stalled = jnp.isfinite(best_l1) & (best_l1 >= s.early_stop_threshold * state.early_stop_best)
  early_stop_count = jnp.where(stalled, state.early_stop_count + 1,
                               jnp.where(jnp.isfinite(best_l1), 0, state.early_stop_count))
  stop = (state.cost_went_up & state.cost_went_down
          & (early_stop_count >= s.early_stop_patience))

  set_count = jnp.where((state.cost == 0) & succeeded, state.cost_set_count + 1, 0)
  cost_set = set_count >= s.patience
  cost = jnp.where(cost_set, jnp.float32(s.init_cost), state.cost)
  up_count = jnp.where(cost_set, 0, state.cost_up_count)
  down_count = jnp.where(cost_set, 0, state.cost_down_count)
  went_up = state.cost_went_up & ~cost_set
  went_down = state.cost_went_down & ~cost_set

  up_count = jnp.where(succeeded, up_count + 1, 0)
  down_count = jnp.where(succeeded, 0, down_count + 1)
  raise_cost = up_count >= s.patience
  lower_cost = ~raise_cost & (down_count >= s.patience)
  cost = jnp.where(raise_cost, cost * s.cost_multiplier,
                   jnp.where(lower_cost, cost / s.cost_multiplier ** 1.5, cost))

  new = state._replace(
      cost=cost, cost_set_count=set_count,
      cost_up_count=jnp.where(raise_cost, 0, up_count),
      cost_down_count=jnp.where(lower_cost, 0, down_count),
      cost_went_up=went_up | raise_cost, cost_went_down=went_down | lower_cost,
      best_mask=best_mask, best_pattern=best_pattern, best_l1=best_l1,
      early_stop_count=early_stop_count,
      early_stop_best=jnp.minimum(best_l1, state.early_stop_best), stopped=stop)
  new = jax.tree.map(lambda old, fresh: jnp.where(state.stopped, old, fresh), state, new)
  zero = jnp.float32(0)
  return new._replace(success_sum=zero, l1_sum=zero, loss_sum=zero), means


@functools.lru_cache(maxsize=None)
def compiled(apply_fn: Callable, settings: Settings, vmapped: bool) -> tuple[Callable, Callable]:
  """The jitted (update, end_step) pair: over all classes at once, or for one class.

  Vmapped, the state and targets carry a leading class axis and the model's variables
  and the batch are shared.
  """
  step = functools.partial(update, apply_fn=apply_fn, settings=settings)
  finish = functools.partial(end_step, settings=settings)
  if vmapped:
    step = jax.vmap(step, in_axes=(0, None, None, None, 0))
    finish = jax.vmap(finish)
  return jax.jit(step, donate_argnums=0), jax.jit(finish)


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


def _optimise(step_fns, state: ClassState, variables, images, targets, *, key: jax.Array,
              settings: Settings, start_step: int,
              on_step: Callable[[int, ClassState, dict], None] | None) -> ClassState:
  update_fn, end_fn = step_fns
  order = BatchOrder(key, images.shape[0], settings.batch_size)
  for step in range(start_step, settings.steps):
    if bool(np.all(np.asarray(state.stopped))):
      break
    for i in range(settings.mini_batches):
      state = update_fn(state, variables, images, order(step * settings.mini_batches + i),
                        targets)
    state, means = end_fn(state)
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
      `fold_in(key, 1)` the batches.
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
  sigmoid = lambda logits: 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
  succeeded = np.isfinite(np.asarray(state.best_l1))
  masks = np.where(succeeded[:, None, None], np.asarray(state.best_mask),
                   sigmoid(state.theta_mask))
  patterns = np.where(succeeded[:, None, None, None], np.asarray(state.best_pattern),
                      sigmoid(state.theta_pattern))
  masks, patterns = masks.astype(np.float32), patterns.astype(np.float32)
  return Reversed(masks, patterns, masks.sum(axis=(1, 2)), succeeded)


def anomaly_index(norms: ArrayLike) -> jax.Array:
  """`|n_c - median(n)| / (1.4826 * MAD(n))` for mask norms n [K]; returns [K] float32.

  Where the MAD is 0, a norm off the median scores inf and one on it 0.
  """
  norms = jnp.asarray(norms, jnp.float32)
  chex.assert_rank(norms, 1)
  median = jnp.median(norms)
  deviation = jnp.abs(norms - median)
  mad = MAD_CONSISTENCY * jnp.median(deviation)
  safe_mad = jnp.where(mad > 0, mad, 1.0)
  return jnp.where(mad > 0, deviation / safe_mad, jnp.where(deviation > 0, jnp.inf, 0.0))


def flagged(norms: ArrayLike, *, threshold: float = 2.0,
            eligible: ArrayLike | None = None) -> int | None:
  """The suspected target: of the classes whose norm is below the median and whose anomaly
  index exceeds `threshold`, the one of smallest norm; None if there is none.

  Args:
    norms: [K] mask norms.
    threshold: the anomaly index a class must exceed.
    eligible: optional [K] bool; only these classes can be flagged (the stage passes
      `Reversed.succeeded`: a mask that never flipped S is no trigger). All classes count
      in the median and the MAD.
  """
  norms = np.asarray(norms, np.float32)
  index = np.asarray(anomaly_index(norms))
  candidates = (norms < np.median(norms)) & (index > threshold)
  if eligible is not None:
    candidates &= np.asarray(eligible, bool)
  candidates = np.flatnonzero(candidates)
  if not len(candidates):
    return None
  return int(candidates[np.argmin(norms[candidates])])
