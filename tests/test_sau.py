"""SAU's PGD objective, shared PGD and unlearning loss against NumPy; SAU through DEFENSES."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_nad_ft_sam import TUNING, _changed, _inputs

from linfjax import config as config_lib
from linfjax.defenses import DEFENSES, sau


def _softmax(z):
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _ce(z, y):
  return -np.log(_softmax(z)[np.arange(len(y)), y])


def _np_pgd_terms(z, z_ref, pred0, pred0_ref, y, beta_adv, beta_shared):
  """(loss, shared, dloss/dz, dloss/dz_ref), float64, the clamp at 1e-8 inactive."""
  batch, classes = z.shape
  p, q = _softmax(z), _softmax(z_ref)
  m = 0.5 * (p + q)
  flipped, flipped_ref = z.argmax(1) != pred0, z_ref.argmax(1) != pred0_ref
  shared = flipped & flipped_ref & (z.argmax(1) == z_ref.argmax(1))
  js = 0.5 * (p * np.log(p) + q * np.log(q)).sum(1) - (m * np.log(m)).sum(1)
  loss = (-beta_adv / (2 * batch) * (_ce(z, y)[~flipped].sum() + _ce(z_ref, y)[~flipped_ref].sum())
          + beta_shared / batch * js[~shared].sum())
  one_hot = np.eye(classes)[y]

  def through_softmax(probs, dprobs):  # d/dz_j = p_j (g_j - sum_i g_i p_i)
    return probs * (dprobs - (dprobs * probs).sum(1, keepdims=True))

  grads = []
  for probs, not_flipped in ((p, ~flipped), (q, ~flipped_ref)):
    adv = -beta_adv / (2 * batch) * (probs - one_hot) * not_flipped[:, None]
    dprobs = 0.5 * np.log(probs / m)
    grads.append(adv + beta_shared / batch * through_softmax(probs, dprobs) * ~shared[:, None])
  return loss, shared, grads[0], grads[1]


def test_pgd_loss_and_js_on_hand_made_logits():
  z = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.5, 0.0]])
  z_ref = np.array([[0.0, 2.0, 0.0], [0.0, 3.0, 0.5], [0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
  pred0, pred0_ref = np.array([1, 0, 2, 0]), np.array([2, 0, 2, 1])
  y = np.array([1, 0, 2, 1])
  # Example 0: f flips 1 -> 0, f0 flips 2 -> 1: both flipped, to different classes.
  # Example 1: both flip 0 -> 1, to the same class: shared. Example 2: f not flipped,
  # f0 flipped 2 -> 1. Example 3: f not flipped (0), f0 flipped 1 -> 0.
  loss, shared = sau.pgd_loss(jnp.asarray(z), jnp.asarray(z_ref), pred0, pred0_ref, y, 0.3, 2.0)
  np.testing.assert_array_equal(shared, [False, True, False, False])
  want, want_shared, _, _ = _np_pgd_terms(z, z_ref, pred0, pred0_ref, y, 0.3, 2.0)
  np.testing.assert_array_equal(want_shared, shared)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # JS of identical distributions is 0; of one-hot-like ones close to log 2.
  js = np.asarray(sau.js_divergence(jnp.array([[0.0, 0.0], [30.0, 0.0]]),
                                    jnp.array([[0.0, 0.0], [0.0, 30.0]])))
  np.testing.assert_allclose(js, [0.0, np.log(2)], atol=1e-6)


def _np_shared_pgd(w, w_ref, x, y, values):
  flat = lambda v: v.reshape(len(v), -1)
  pred0, pred0_ref = (flat(x) @ w).argmax(1), (flat(x) @ w_ref).argmax(1)
  delta, done, masks = np.full_like(x, values.eps), False, []
  for _ in range(values.steps):
    _, shared, dz, dz_ref = _np_pgd_terms(flat(x + delta) @ w, flat(x + delta) @ w_ref, pred0,
                                          pred0_ref, y, values.beta_adv, values.beta_shared)
    masks.append(shared)
    grad = (dz @ w.T + dz_ref @ w_ref.T).reshape(x.shape)
    moved = np.clip(delta - values.step_size * np.sign(grad), -values.eps, values.eps)
    delta = delta if done else moved
    done = done or shared.all()
  return delta, masks


def test_shared_pgd_matches_numpy_on_linear_models():
  rng = np.random.default_rng(4)
  x = rng.uniform(0, 1, (8, 2, 2, 3))
  w, w_ref = rng.normal(size=(12, 4)), rng.normal(size=(12, 4))
  y = rng.integers(0, 4, 8)
  values = sau.Settings(eps=0.3, steps=3, step_size=0.2, beta_adv=0.5, beta_shared=1.0)
  want, masks = _np_shared_pgd(w, w_ref, x, y, values)
  logits_fn = lambda v, images: images.reshape(len(images), -1) @ v
  got = sau.shared_pgd(logits_fn, jnp.asarray(w, jnp.float32), jnp.asarray(w_ref, jnp.float32),
                       jnp.asarray(x, jnp.float32), jnp.asarray(y), values)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
  # The case is not trivial: some examples become shared, not all; d takes inner values.
  assert 0 < sum(m.sum() for m in masks) < 8 * len(masks)
  assert len(np.unique(np.round(want, 6))) > 2


def test_pgd_stops_once_every_example_is_shared():
  """Two identical models that the +eps start flips entirely: one step, then d is frozen."""
  w = np.zeros((3, 2))
  w[:, 1] = 1.0
  x = np.zeros((2, 1, 1, 3))  # Clean logits tie at 0 -> class 0; at +eps class 1 wins.
  logits_fn = lambda v, images: images.reshape(len(images), -1) @ v
  values = sau.Settings(eps=0.2, steps=4, step_size=0.05)
  got = sau.shared_pgd(logits_fn, jnp.asarray(w), jnp.asarray(w), jnp.asarray(x),
                       jnp.array([0, 0]), values)
  want, masks = _np_shared_pgd(w, w, x, np.array([0, 0]), values)
  assert masks[0].all()  # Shared from the start: the loss's gradient is 0, d stays at +eps.
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-7)
  np.testing.assert_allclose(np.asarray(got), 0.2, atol=1e-7)


def test_unlearning_loss_on_hand_made_logits():
  z = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.5, 0.5, 0.0]])
  z_adv = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 9.0], [1.0, 0.0, 2.0]])
  z_adv_ref = np.array([[0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
  pred0_ref, y = np.array([0, 2, 0]), np.array([0, 1, 1])
  # k = f0's prediction on x+d: 1, 2, 1. Example 0: k != y and != f0's clean prediction ->
  # unlearned; example 1: k is f0's clean prediction -> not; example 2: k is the label -> not.
  values = sau.Settings(lambda_clean=0.7, lambda_adv=0.4, lambda_shared=1.5)
  got = sau.unlearning_loss(jnp.asarray(z), jnp.asarray(z_adv), jnp.asarray(z_adv_ref),
                            pred0_ref, y, values)
  pos = _softmax(z_adv)[0, 1]
  shared = (-np.log(1e-6 + min(1 - pos, 0.999)) - np.log(1 + 1e-6 - max(pos, 0.001))) / 2 / 3
  want = 0.7 * _ce(z, y).mean() + 0.4 * _ce(z_adv, y).mean() + 1.5 * shared
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # The clamps: a k that f already gives (almost) no probability is discarded: its terms are
  # -log(1e-6 + 0.999) and -log(1 + 1e-6 - 0.001), and it sends no gradient.
  z_adv[0] = [40.0, 0.0, 0.0]
  only = sau.Settings(lambda_clean=0.0)
  loss = lambda adv: sau.unlearning_loss(jnp.asarray(z), adv, jnp.asarray(z_adv_ref),
                                         pred0_ref, y, only)
  np.testing.assert_allclose(float(loss(jnp.asarray(z_adv))), -2 * np.log(0.999001) / 2 / 3,
                             rtol=1e-4)
  assert not np.any(np.asarray(jax.grad(loss)(jnp.asarray(z_adv))))


def test_sau_through_the_registry():
  inputs = _inputs()
  record = DEFENSES["sau"].run(inputs, (sau.Settings(), TUNING))
  assert record.pruned == 0 and record.masks is None
  assert record.details["eps"] == 0.2 and record.details["steps"] == 5
  assert _changed(inputs.variables, record.variables)
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(record.variables))
  # Batch norm runs in evaluation mode, as the reference's: its statistics stay the model's.
  for old, new in zip(jax.tree.leaves(inputs.variables["batch_stats"]),
                      jax.tree.leaves(record.variables["batch_stats"])):
    np.testing.assert_array_equal(old, new)
  assert not DEFENSES["sau"].needs_trigger


def test_sau_settings_that_minimise_nothing_are_refused():
  config = config_lib.make_quick(config_lib.base_config())
  config.prune.sau.update(lambda_clean=0.0, lambda_shared=0.0)
  with pytest.raises(config_lib.ConfigError, match=re.escape(
      "config.prune.sau.lambda_shared: lambda_clean, lambda_adv and lambda_shared are all 0")):
    config_lib.validate(config)
