"""i-BAU's implicit hypergradient against a closed form; the defense through DEFENSES."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linfjax.defenses import DEFENSES, ibau
from test_nad_ft_sam import _inputs  # A tiny CNN on 64 random 16x16 images, 4 classes.


def _quadratic(seed=0):
  """Inner h(d, t) = 0.5 d'Ad - d'Bt (its minimiser d* = A^-1 B t), the map
  Phi(d, t) = d - alpha (Ad - Bt), outer f(d, t) = c'd + 0.5 t'Dt with t = (t1, t2)."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  a = q @ np.diag([1.0, 2.0, 3.0, 5.0]) @ q.T
  b, c = rng.normal(size=(4, 3)), rng.normal(size=4)
  m = rng.normal(size=(3, 3))
  d = m @ m.T + np.eye(3)
  theta, delta = rng.normal(size=3), rng.normal(size=4)
  return a, b, c, d, theta, delta


def _jax_problem(a, b, c, d, alpha):
  a, b, c, d = (jnp.asarray(v, jnp.float32) for v in (a, b, c, d))
  join = lambda t: jnp.concatenate([t["t1"], t["t2"]])

  def fixed_point_map(delta, params):
    return {"d": delta["d"] - alpha * (a @ delta["d"] - b @ join(params))}

  def outer_loss(delta, params):
    t = join(params)
    return c @ delta["d"] + 0.5 * t @ d @ t

  return fixed_point_map, outer_loss


def test_hypergradient_matches_the_series_and_the_implicit_gradient():
  a, b, c, d, theta, delta = _quadratic()
  alpha = 0.1  # I - alpha A has eigenvalues 0.9 .. 0.5: the series converges.
  fp_map, outer = _jax_problem(a, b, c, d, alpha)
  params = {"t1": jnp.asarray(theta[:2], jnp.float32), "t2": jnp.asarray(theta[2:], jnp.float32)}
  point = {"d": jnp.asarray(delta, jnp.float32)}
  flat = lambda g: np.concatenate([np.asarray(g["t1"]), np.asarray(g["t2"])])
  jac = np.eye(4) - alpha * a
  for k in (1, 5):
    v = sum(np.linalg.matrix_power(jac, i) @ c for i in range(k))  # K terms, from v = 0.
    grads, got_v = ibau.hypergradient(outer, fp_map, point, params, k)
    np.testing.assert_allclose(np.asarray(got_v["d"]), v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flat(grads), d @ theta + alpha * b.T @ v, rtol=1e-5, atol=1e-6)
  # Many terms: the exact gradient of F(t) = f(A^-1 B t, t), i.e. Dt + B'A^-1 c.
  exact = d @ theta + b.T @ np.linalg.solve(a, c)
  grads, _ = ibau.hypergradient(outer, fp_map, point, params, 300)
  np.testing.assert_allclose(flat(grads), exact, rtol=1e-4, atol=1e-5)
  # ... which a central difference of F agrees with; K = 5 is still visibly short of it.
  big_f = lambda t: c @ np.linalg.solve(a, b @ t) + 0.5 * t @ d @ t
  fd = np.array([(big_f(theta + 1e-6 * e) - big_f(theta - 1e-6 * e)) / 2e-6 for e in np.eye(3)])
  np.testing.assert_allclose(fd, exact, rtol=1e-6, atol=1e-7)
  five, _ = ibau.hypergradient(outer, fp_map, point, params, 5)
  assert np.abs(flat(five) - exact).max() > 1e-2


def test_batches_cover_s_once_with_a_smaller_last_batch():
  parts = ibau.batches(jax.random.key(3), 10, 4)
  assert [len(p) for p in parts] == [4, 4, 2]
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(10))
  assert [len(p) for p in ibau.batches(jax.random.key(3), 8, 8)] == [8]


def test_ibau_through_the_registry():
  inputs = _inputs()
  values = ibau.Settings(rounds=2, fixed_point_iterations=3, learning_rate=1e-3,
                         batch_size=32, portion=0.25)
  defense = DEFENSES["ibau"]
  assert not defense.needs_trigger
  record = defense.run(inputs, values)
  details = record.details
  assert record.pruned == 0 and record.masks is None
  assert details["rounds"] == 2 and details["batches_per_round"] == 2
  assert len(details["delta_norms"]) == 2 and details["final_delta_norm"] > 0
  # Each round's unlearning lowers the loss on S + delta (delta held fixed).
  assert all(a < b for a, b in zip(details["loss_after"], details["loss_before"]))
  leaves = zip(jax.tree.leaves(inputs.variables["params"]),
               jax.tree.leaves(record.variables["params"]))
  assert any(not np.allclose(x, y) for x, y in leaves)
  assert jax.tree.structure(record.variables) == jax.tree.structure(inputs.variables)
  # Batch norm stays in evaluation mode: its statistics are the model's.
  for x, y in zip(jax.tree.leaves(inputs.variables["batch_stats"]),
                  jax.tree.leaves(record.variables["batch_stats"])):
    np.testing.assert_array_equal(x, y)
  # The projection bounds delta's norm.
  bounded = defense.run(inputs, ibau.Settings(rounds=1, fixed_point_iterations=3,
                                              learning_rate=1e-3, batch_size=32, portion=0.25,
                                              max_norm=1e-3))
  np.testing.assert_allclose(bounded.details["delta_norms"], [1e-3], rtol=1e-5)


def test_ibau_refuses_a_batch_that_perturbs_nothing():
  with pytest.raises(ValueError, match=r"ibau: portion 0.01 of a batch of 64 \(S has 64"):
    DEFENSES["ibau"].run(_inputs(), ibau.Settings(batch_size=256))
