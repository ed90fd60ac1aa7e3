"""NAD's attention maps and loss, and FT-SAM's step, against NumPy; both through DEFENSES."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from linfjax import attacks, models
from linfjax import config as config_lib
from linfjax.defenses import DEFENSES, fine_tuning, ft_sam, nad
from linfjax.defenses.base import Inputs


def _np_attention(a, p):
  amap = (np.abs(a) ** p).mean(axis=-1).reshape(len(a), -1)
  return amap / np.maximum(np.linalg.norm(amap, axis=1, keepdims=True), 1e-12)


def test_attention_map_and_distillation_loss_match_numpy():
  rng = np.random.default_rng(0)
  student = {"a": rng.normal(size=(3, 4, 4, 5)), "b": rng.normal(size=(3, 2, 2, 7))}
  teacher = {"a": rng.normal(size=(3, 4, 4, 5)), "b": rng.normal(size=(3, 2, 2, 7))}
  got = np.asarray(nad.attention(jnp.asarray(student["a"], jnp.float32), 2.0))
  np.testing.assert_allclose(got, _np_attention(student["a"], 2.0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
  # One hand-checked map: a single image, 2 positions, 2 channels.
  one = np.array([[[[3.0, 1.0]], [[0.0, 2.0]]]])  # [1, 2, 1, 2]: means of a^2 are 5 and 2.
  np.testing.assert_allclose(np.asarray(nad.attention(jnp.asarray(one), 2.0)),
                             [[5 / np.sqrt(29), 2 / np.sqrt(29)]], rtol=1e-6)
  want = sum(np.mean((_np_attention(student[k], 2.0) - _np_attention(teacher[k], 2.0)) ** 2)
             for k in student)
  as_jax = lambda d: {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}
  got = float(nad.distillation_loss(as_jax(student), as_jax(teacher), 2.0))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert want > 0 and float(nad.distillation_loss(as_jax(student), as_jax(student), 2.0)) == 0


def test_sam_step_matches_numpy_on_a_quadratic():
  """loss(w) = 0.5 w'Aw + b'w: g = Aw + b, e = rho g/||g||, the step uses A(w + e) + b."""
  rng = np.random.default_rng(1)
  m = rng.normal(size=(4, 4))
  a, b = m @ m.T + np.eye(4), rng.normal(size=4)
  w = {"x": rng.normal(size=3), "y": rng.normal(size=1)}  # Two leaves: the norm is global.
  rho, lr = 0.3, 0.1
  flat = np.concatenate([w["x"], w["y"]])
  g = a @ flat + b
  sharp = a @ (flat + rho * g / np.linalg.norm(g)) + b
  want = flat - lr * sharp

  def loss_fn(params):
    v = jnp.concatenate([params["x"], params["y"]])
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return 0.5 * v @ a32 @ v + b32 @ v, None

  params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), w)
  loss, _, grads = ft_sam.sam_gradient(loss_fn, params, rho)
  tx = optax.sgd(lr)
  updates, _ = tx.update(grads, tx.init(params))
  stepped = optax.apply_updates(params, updates)
  np.testing.assert_allclose(float(loss), 0.5 * flat @ a @ flat + b @ flat, rtol=1e-5)
  np.testing.assert_allclose(np.concatenate([stepped["x"], stepped["y"]]), want,
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(sharp, g)  # The perturbation matters: plain SGD would differ.


def _inputs():
  model = models.create("cnn", num_classes=4, width=0.125,
                        probe_layers=("conv2_2", "conv3_2"))
  variables = models.init(model, jax.random.key(0), (16, 16, 3))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
  trigger = attacks.patch((16, 16, 3), size=2, row=0, col=0, pattern=np.ones((2, 2, 3)))
  return Inputs(model=model, variables=variables, images=images,
                labels=np.arange(64, dtype=np.int32) % 4, trigger=trigger, target=1,
                mode="all_to_one", layer="conv3_2", seed=0,
                recipe=config_lib.base_config().train)


def _changed(before, after):
  leaves = zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"]))
  return any(not np.allclose(x, y) for x, y in leaves)


TUNING = fine_tuning.Settings(epochs=1, learning_rate=0.01, batch_size=32)


def test_ft_sam_through_the_registry():
  inputs = _inputs()
  record = DEFENSES["ft_sam"].run(inputs, (ft_sam.Settings(rho=0.05), TUNING))
  assert record.pruned == 0 and record.masks is None and record.details["rho"] == 0.05
  assert _changed(inputs.variables, record.variables)
  assert jax.tree.structure(record.variables) == jax.tree.structure(inputs.variables)


def test_nad_through_the_registry():
  tuning = TUNING
  inputs = _inputs()
  record = DEFENSES["nad"].run(inputs, (nad.Settings(), tuning))
  assert record.details["layers"] == ["conv2_2", "conv3_2"] and record.details["beta"] == 1000.0
  assert _changed(inputs.variables, record.variables)
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(record.variables))
  # The teacher is the fine-tuning control's model, tuned once per run and shared.
  assert len(inputs.cache["tuned"]) == 1
  control = DEFENSES["fine_tuning"].run(inputs, tuning)
  assert len(inputs.cache["tuned"]) == 1 and control.variables is not None
