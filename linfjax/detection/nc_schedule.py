"""Neural Cleanse's settings (the `reverse` block's solve fields), and its adaptive cost
schedule and early stop, for one class, after each step.

Reverse engineering (linfjax/detection/neural_cleanse.py) minimises
`CE(f((1 - m) * x + m * p), c) + cost * ||m||_1`, and the weight `cost` follows Neural
Cleanse's schedule. After each *step* (a few Adam updates), with `s` the step's attack
success and `n` its mask norm:
  - the best result so far is kept when `s >= threshold` and `n` is below the best norm;
  - the cost starts at `init_cost` (BackdoorBench's NC), or at 0 with
    `reset_cost_to_zero` (NC's own code), where it is set to `init_cost` once
    `s >= threshold` for `patience` steps in a row (the up/down flags reset then);
  - then `patience` successful steps in a row multiply the cost by `cost_multiplier`,
    `patience` failing steps divide it by `cost_multiplier ** 1.5`;
  - a class stops early once its cost has gone both up and down and its best norm has not
    dropped below `early_stop_threshold` times its earlier best for `early_stop_patience`
    steps. A stopped class keeps its state.
Everything is jnp and elementwise, so `jax.vmap` runs every class's schedule at once.

References:
  Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
  Networks", IEEE S&P 2019 (and its code, github.com/bolunwang/backdoor).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from linfjax import settings
from linfjax.settings import boolean, integer, number, spec


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The schedule's settings, patiences counted in steps."""
  init_cost: float
  reset_cost_to_zero: bool
  cost_multiplier: float
  patience: int
  attack_success_threshold: float
  early_stop_threshold: float
  early_stop_patience: int


class ScheduleState(NamedTuple):
  """One class's schedule: the cost, its counters and flags, the best trigger so far.

  Counters are int32, flags bool, norms float32 (`best_l1` is inf until a step succeeds).
  """
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


def init(schedule: Schedule, mask: jax.Array, pattern: jax.Array) -> ScheduleState:
  """The state before the first step; `mask` and `pattern` stand as the 'best' until one
  succeeds."""
  int_zero, false = jnp.int32(0), jnp.bool_(False)
  cost = jnp.float32(0.0 if schedule.reset_cost_to_zero else schedule.init_cost)
  return ScheduleState(
      cost=cost, cost_set_count=int_zero, cost_up_count=int_zero, cost_down_count=int_zero,
      cost_went_up=false, cost_went_down=false, best_mask=mask, best_pattern=pattern,
      best_l1=jnp.float32(jnp.inf), early_stop_count=int_zero,
      early_stop_best=jnp.float32(jnp.inf), stopped=false)


def after_step(state: ScheduleState, schedule: Schedule, *, success: jax.Array, l1: jax.Array,
               mask: jax.Array, pattern: jax.Array) -> ScheduleState:
  """The schedule's bookkeeping after one step.

  Args:
    state: the class's schedule state.
    schedule: the settings.
    success: the step's attack success in [0, 1].
    l1: the step's mask norm.
    mask: [H, W], pattern: [H, W, C]: the trigger that `success` and `l1` describe (kept
      as the best when it is).

  Returns:
    The new state; a stopped class's state is returned unchanged.
  """
  s = schedule
  succeeded = success >= s.attack_success_threshold
  better = succeeded & (l1 < state.best_l1)
  best_mask = jnp.where(better, mask, state.best_mask)
  best_pattern = jnp.where(better, pattern, state.best_pattern)
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

  new = ScheduleState(
      cost=cost, cost_set_count=set_count,
      cost_up_count=jnp.where(raise_cost, 0, up_count),
      cost_down_count=jnp.where(lower_cost, 0, down_count),
      cost_went_up=went_up | raise_cost, cost_went_down=went_down | lower_cost,
      best_mask=best_mask, best_pattern=best_pattern, best_l1=best_l1,
      early_stop_count=early_stop_count,
      early_stop_best=jnp.minimum(best_l1, state.early_stop_best), stopped=stop)
  return jax.tree.map(lambda old, fresh: jnp.where(state.stopped, old, fresh), state, new)


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """Neural Cleanse's hyperparameters (a config's `reverse` block); patiences in updates.

  Values from NC's code (its GTSRB example) unless marked "ours". A step is `mini_batches`
  Adam updates followed by the adaptive-cost bookkeeping.
  """
  steps: int = spec(1000, integer(1), "NC's steps.")
  mini_batches: int = spec(16, integer(1), "Ours: Adam updates a step, one pass over the 500 "
                           "images of S (NC: 1000 / 32).")
  batch_size: int = spec(32, integer(1), "Images of S per update.")
  learning_rate: float = spec(0.1, number(0.0, 10.0, low_open=True),
                              "Adam, betas (0.5, 0.9); NC's tanh parametrisation.")
  init_cost: float = spec(1e-3, number(0.0, 1e3, low_open=True), "The mask norm's first cost.")
  reset_cost_to_zero: bool = spec(False, boolean(),
                                  "NC's code starts the cost at 0 and sets it to init_cost after "
                                  "`patience` successes; BackdoorBench's NC starts at init_cost "
                                  "(ours: the default).")
  cost_multiplier: float = spec(2.0, number(1.0, 100.0, low_open=True),
                                "Up by this, down by its 1.5th power.")
  patience: int = spec(80, integer(1), "Adam updates of success (failure) before the cost moves "
                       "(NC: 5 steps).")
  attack_success_threshold: float = spec(0.99, number(0.0, 1.0, low_open=True),
                                         "The attack success a class must reach.")
  success_images: int = spec(0, integer(0), "Images of S each step's success is judged on by a "
                             "forward-only pass of the current trigger (ours); 0: the mean over "
                             "the step's mini-batches, as NC.")
  early_stop_threshold: float = spec(1.0, number(0.0, 1.0, low_open=True),
                                     "Stalled: best norm >= this x the earlier best.")
  early_stop_patience: int = spec(400, integer(1), "Stalled Adam updates before a class stops "
                                  "(NC: 25 steps).")

  @property
  def schedule(self) -> Schedule:
    """The cost schedule, its patiences converted from updates to steps (at least 1)."""
    in_steps = lambda updates: max(1, math.ceil(updates / self.mini_batches))
    return Schedule(
        init_cost=self.init_cost, reset_cost_to_zero=self.reset_cost_to_zero,
        cost_multiplier=self.cost_multiplier, patience=in_steps(self.patience),
        attack_success_threshold=self.attack_success_threshold,
        early_stop_threshold=self.early_stop_threshold,
        early_stop_patience=in_steps(self.early_stop_patience))
