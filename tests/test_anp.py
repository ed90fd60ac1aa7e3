"""ANP on a one-batch-norm model whose gradients are known in closed form, and on a tiny CNN."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linfjax import models
from linfjax.defenses import anp, bn

EPS = 1e-5  # Flax BatchNorm's epsilon.


class OneNorm(nn.Module):
  """Batch norm, global average pooling, dense: pooled_k = gamma_k * mean(xhat_k) + beta_k."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.BatchNorm(use_running_average=not train, epsilon=EPS)(x)
    return nn.Dense(3)(jnp.mean(h, axis=(1, 2))), {}


def _setup():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 3, 3, 4)).astype(np.float32)
  labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
  model = OneNorm()
  variables = model.init(jax.random.key(0), jnp.asarray(x))
  params = dict(variables["params"])
  params["BatchNorm_0"] = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 4), jnp.float32),
                           "bias": jnp.asarray(rng.normal(size=4), jnp.float32)}
  return model, {**variables, "params": params}, x, labels


def _reference(variables, x, labels, scale_factor, bias_factor):
  """CE and its gradients wrt the scale and bias factors, by hand in float64."""
  gamma = np.asarray(variables["params"]["BatchNorm_0"]["scale"], np.float64)
  beta = np.asarray(variables["params"]["BatchNorm_0"]["bias"], np.float64)
  w = np.asarray(variables["params"]["Dense_0"]["kernel"], np.float64)
  b = np.asarray(variables["params"]["Dense_0"]["bias"], np.float64)
  x = x.astype(np.float64)
  mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  xhat = ((x - mean) / np.sqrt(var + EPS)).mean(axis=(1, 2))  # [B, K]
  pooled = gamma * scale_factor * xhat + beta * bias_factor
  logits = pooled @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  n = len(labels)
  loss = -np.mean(np.log(p[np.arange(n), labels]))
  dlogits = (p - np.eye(3)[labels]) / n
  dpooled = dlogits @ w.T
  return loss, (dpooled * xhat).sum(0) * gamma, dpooled.sum(0) * beta


def test_perturbation_multiplies_scale_and_bias():
  _, variables, _, _ = _setup()
  masks = {"BatchNorm_0": jnp.array([1.0, 0.5, 0.0, 1.0])}
  delta = {"BatchNorm_0": jnp.array([0.1, -0.2, 0.3, 0.0])}
  xi = {"BatchNorm_0": jnp.array([-0.4, 0.0, 0.2, 0.1])}
  out = anp.perturbed_variables(variables, masks, delta, xi)["params"]["BatchNorm_0"]
  gamma = variables["params"]["BatchNorm_0"]["scale"]
  beta = variables["params"]["BatchNorm_0"]["bias"]
  np.testing.assert_allclose(out["scale"], gamma * np.array([1.1, 0.3, 0.3, 1.0]), rtol=1e-6)
  np.testing.assert_allclose(out["bias"], beta * np.array([0.6, 1.0, 1.2, 1.1]), rtol=1e-6)
  plain = anp.perturbed_variables(variables, masks)["params"]["BatchNorm_0"]
  np.testing.assert_allclose(plain["scale"], gamma * masks["BatchNorm_0"], rtol=1e-6)
  np.testing.assert_array_equal(plain["bias"], beta)
  noise = anp.initial_noise(jax.random.key(1), {"a": jnp.ones(1000)}, 0.4)
  assert float(jnp.abs(noise[0]["a"]).max()) <= 0.4 and float(jnp.abs(noise[1]["a"]).max()) <= 0.4
  assert float(jnp.abs(noise[0]["a"]).mean()) == pytest.approx(0.2, abs=0.02)


def test_one_mask_step_matches_the_hand_computation():
  model, variables, x, labels = _setup()
  settings = anp.Hyperparameters(eps=0.4, steps=1, alpha=0.2, learning_rate=0.2, momentum=0.9)
  optimizer = anp._optimizer(settings.learning_rate, settings.momentum)
  masks = {"BatchNorm_0": jnp.array([1.0, 0.9, 0.2, 0.6])}
  key = jax.random.key(7)
  step = jax.jit(lambda m, s, k: anp.mask_step(m, s, variables, jnp.asarray(x), labels, k,
                                                  apply_fn=model.apply, settings=settings,
                                                  optimizer=optimizer))
  new_masks, _, loss = step(masks, optimizer.init(masks), key)

  m = np.asarray(masks["BatchNorm_0"], np.float64)
  delta0, xi0 = (np.asarray(n["BatchNorm_0"], np.float64)
                 for n in anp.initial_noise(key, masks, 0.4))
  _, d_delta, d_xi = _reference(variables, x, labels, m + delta0, 1 + xi0)
  delta = np.clip(delta0 + 0.4 * np.sign(d_delta), -0.4, 0.4)
  xi = np.clip(xi0 + 0.4 * np.sign(d_xi), -0.4, 0.4)
  natural, d_natural, _ = _reference(variables, x, labels, m, np.ones(4))
  robust, d_robust, _ = _reference(variables, x, labels, m + delta, 1 + xi)
  np.testing.assert_allclose(loss, 0.2 * natural + 0.8 * robust, rtol=1e-4)
  gradient = 0.2 * d_natural + 0.8 * d_robust
  np.testing.assert_allclose(new_masks["BatchNorm_0"], np.clip(m - 0.2 * gradient, 0, 1),
                             rtol=1e-4, atol=1e-6)


def test_learned_masks_and_pruning_by_threshold_and_count():
  model, variables, x, labels = _setup()
  images = np.clip(x * 40 + 128, 0, 255).astype(np.uint8)
  settings = anp.Hyperparameters(iterations=3, batch_size=4, padding=1)
  losses = []
  values = anp.learn_masks(model.apply, variables, images, labels, settings=settings,
                           key=jax.random.key(2), on_update=losses.append)
  assert len(losses) == 3 and all(np.isfinite(float(loss)) for loss in losses)
  assert list(values) == ["BatchNorm_0"] and values["BatchNorm_0"].shape == (4,)
  assert values["BatchNorm_0"].min() >= 0.0 and values["BatchNorm_0"].max() <= 1.0
  assert values["BatchNorm_0"].min() < 1.0

  values = {"a/BatchNorm_0": np.array([0.9, 0.1, 0.2]), "b/BatchNorm_0": np.array([0.05, 0.7])}
  keep = anp.keep_above(values, 0.2)
  np.testing.assert_array_equal(keep["a/BatchNorm_0"], [1, 0, 0])
  np.testing.assert_array_equal(keep["b/BatchNorm_0"], [0, 1])
  keep = anp.keep_all_but_smallest(values, 2)
  np.testing.assert_array_equal(keep["a/BatchNorm_0"], [1, 0, 1])
  np.testing.assert_array_equal(keep["b/BatchNorm_0"], [0, 1])
  assert anp.num_pruned(keep) == 2


def test_pruning_zeroes_the_scale_and_keeps_the_bias():
  model = models.create("cnn", num_classes=4, width=0.125)
  variables = models.init(model, jax.random.key(0), (8, 8, 3))
  keep = {name: np.ones(size, np.float32) for name, size in bn.sizes(variables).items()}
  keep["conv2_1/BatchNorm_0"][[1, 3]] = 0.0
  pruned = anp.pruned_variables(variables, keep)
  scale = np.asarray(bn.scale(pruned, "conv2_1/BatchNorm_0"))
  assert scale[1] == scale[3] == 0.0 and np.all(scale[[0, 2, 4, 5, 6, 7]] != 0.0)
  np.testing.assert_array_equal(bn.bias(pruned, "conv2_1/BatchNorm_0"),
                                bn.bias(variables, "conv2_1/BatchNorm_0"))
  np.testing.assert_array_equal(bn.scale(pruned, "conv1_1/BatchNorm_0"),
                                bn.scale(variables, "conv1_1/BatchNorm_0"))
  with pytest.raises(KeyError, match="not batch-norm layers"):
    bn.rescale(variables, {"head": jnp.ones(4)})
