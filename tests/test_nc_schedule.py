"""Neural Cleanse's cost schedule, step by step against a transcription of NC's loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linfjax.detection import nc_schedule


def _schedule(**overrides):
  values = dict(init_cost=1e-3, reset_cost_to_zero=True, cost_multiplier=2.0, patience=2,
                attack_success_threshold=0.99, early_stop_threshold=1.0, early_stop_patience=3)
  values.update(overrides)
  return nc_schedule.Schedule(**values)


def _nc_reference(successes, norms, s):
  """Neural Cleanse's bookkeeping, transcribed loop by loop: costs after each step, stop step."""
  cost, best, es_best = (0.0 if s.reset_cost_to_zero else s.init_cost), np.inf, np.inf
  set_count = up = down = es_count = 0
  went_up = went_down = False
  costs = []
  for step, (success, norm) in enumerate(zip(successes, norms)):
    if success >= s.attack_success_threshold and norm < best:
      best = norm
    if best < np.inf:
      es_count = es_count + 1 if best >= s.early_stop_threshold * es_best else 0
    es_best = min(best, es_best)
    if went_up and went_down and es_count >= s.early_stop_patience:
      return costs, step
    if cost == 0 and success >= s.attack_success_threshold:
      set_count += 1
      if set_count >= s.patience:
        cost, up, down, went_up, went_down = s.init_cost, 0, 0, False, False
    else:
      set_count = 0
    if success >= s.attack_success_threshold:
      up, down = up + 1, 0
    else:
      up, down = 0, down + 1
    if up >= s.patience:
      up, cost, went_up = 0, cost * s.cost_multiplier, True
    elif down >= s.patience:
      down, cost, went_down = 0, cost / s.cost_multiplier ** 1.5, True
    costs.append(cost)
  return costs, None


@pytest.mark.parametrize("reset_cost_to_zero", [True, False])
def test_schedule_matches_neural_cleanse_step_by_step(reset_cost_to_zero):
  s = _schedule(reset_cost_to_zero=reset_cost_to_zero)
  successes = [0.5, 1, 1, 1, 1, 1, 0.9, 0.2, 1, 0.3, 0.1, 1, 1, 1, 1, 1, 1, 1]
  norms = [90, 80, 70, 60, 50, 40, 35, 30, 30, 30, 30, 30, 31, 32, 33, 34, 35, 36]
  expected_costs, expected_stop = _nc_reference(successes, norms, s)
  assert expected_stop is not None and len(set(expected_costs)) > 3
  mask, pattern = jnp.full((4, 4), 0.5), jnp.full((4, 4, 3), 0.5)
  state = nc_schedule.init(s, mask, pattern)
  np.testing.assert_allclose(float(state.cost), 0.0 if reset_cost_to_zero else 1e-3, rtol=1e-6)
  step_fn = jax.jit(lambda state, success, l1, mask: nc_schedule.after_step(
      state, s, success=success, l1=l1, mask=mask, pattern=pattern))
  costs, stopped_at = [], None
  for step, (success, norm) in enumerate(zip(successes, norms)):
    state = step_fn(state, jnp.float32(success), jnp.float32(norm), jnp.full((4, 4), step / 100))
    if bool(state.stopped):
      stopped_at = step
      break
    costs.append(float(state.cost))
  assert stopped_at == expected_stop
  np.testing.assert_allclose(costs, expected_costs, rtol=1e-6)
  assert float(state.best_l1) == 30.0
  # The best is the first step that reached norm 30 with success: step 8 (step 7 failed).
  np.testing.assert_allclose(state.best_mask, 0.08)


def test_a_stopped_class_is_frozen():
  s = _schedule()
  state = nc_schedule.init(s, jnp.zeros((2, 2)), jnp.zeros((2, 2, 3)))._replace(
      stopped=jnp.bool_(True))
  after = nc_schedule.after_step(state, s, success=jnp.float32(1.0), l1=jnp.float32(1.0),
                                 mask=jnp.ones((2, 2)), pattern=jnp.ones((2, 2, 3)))
  jax.tree.map(np.testing.assert_array_equal, after, state)
