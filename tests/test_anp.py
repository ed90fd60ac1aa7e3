"""ANP on a one-batch-norm model whose gradients are known in closed form, and on a tiny CNN."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linfjax import attacks, models
from linfjax import config as config_lib
from linfjax.defenses import DEFENSES, anp, bn
from linfjax.defenses.base import Inputs
from linfjax.training import metrics

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


def _noise_by_hand(variables, x, labels, m, key, clip):
  """delta0 + eps * sign(dCE/ddelta) (and xi likewise), clipped only when `clip`; float64."""
  masks = {"BatchNorm_0": jnp.asarray(m, jnp.float32)}
  delta0, xi0 = (np.asarray(n["BatchNorm_0"], np.float64)
                 for n in anp.initial_noise(key, masks, 0.4))
  _, d_delta, d_xi = _reference(variables, x, labels, m + delta0, 1 + xi0)
  delta, xi = delta0 + 0.4 * np.sign(d_delta), xi0 + 0.4 * np.sign(d_xi)
  if clip:
    delta, xi = np.clip(delta, -0.4, 0.4), np.clip(xi, -0.4, 0.4)
  return delta, xi


@pytest.mark.parametrize("clip_noise", [False, True])
def test_one_mask_step_matches_the_hand_computation(clip_noise):
  model, variables, x, labels = _setup()
  settings = anp.Hyperparameters(eps=0.4, steps=1, alpha=0.2, learning_rate=0.2, momentum=0.9,
                                 clip_noise=clip_noise)
  optimizer = anp._optimizer(settings.learning_rate, settings.momentum)
  masks = {"BatchNorm_0": jnp.array([1.0, 0.9, 0.2, 0.6])}
  key = jax.random.key(7)
  step = jax.jit(lambda m, s, k: anp.mask_step(m, s, variables, jnp.asarray(x), labels, k,
                                                  apply_fn=model.apply, settings=settings,
                                                  optimizer=optimizer))
  new_masks, _, loss = step(masks, optimizer.init(masks), key)

  m = np.asarray(masks["BatchNorm_0"], np.float64)
  delta, xi = _noise_by_hand(variables, x, labels, m, key, clip_noise)
  natural, d_natural, _ = _reference(variables, x, labels, m, np.ones(4))
  robust, d_robust, _ = _reference(variables, x, labels, m + delta, 1 + xi)
  np.testing.assert_allclose(loss, 0.2 * natural + 0.8 * robust, rtol=1e-4)
  gradient = 0.2 * d_natural + 0.8 * d_robust
  np.testing.assert_allclose(new_masks["BatchNorm_0"], np.clip(m - 0.2 * gradient, 0, 1),
                             rtol=1e-4, atol=1e-6)


def test_noise_is_not_clipped_as_optimize_mask_cifar_py_and_backdoorbench_anp_py():
  """One perturbation step against NumPy: unclipped (both references: `noise_opt.step()`
  after `sign_grad`, no clamp), reaching beyond eps; clipped only with `clip_noise`."""
  model, variables, x, labels = _setup()
  masks = {"BatchNorm_0": jnp.array([1.0, 0.9, 0.2, 0.6])}
  m = np.asarray(masks["BatchNorm_0"], np.float64)
  key = jax.random.key(3)
  for clip in (False, True):
    settings = anp.Hyperparameters(eps=0.4, steps=1, clip_noise=clip)
    got = jax.jit(lambda k: anp.adversarial_noise(masks, variables, jnp.asarray(x), labels, k,
                                                    apply_fn=model.apply, settings=settings))(key)
    delta, xi = _noise_by_hand(variables, x, labels, m, key, clip)
    np.testing.assert_allclose(got[0]["BatchNorm_0"], delta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1]["BatchNorm_0"], xi, rtol=1e-5, atol=1e-6)
    largest = max(np.abs(delta).max(), np.abs(xi).max())
    assert (largest <= 0.4 + 1e-6) if clip else (largest > 0.4)
  assert anp.Settings().clip_noise is False and anp.Hyperparameters().clip_noise is False


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
  # 0.20004 lies above 0.2; as written to mask_values.txt ('{:.4f}') it is 0.2000.
  values = {"c": np.array([0.2, 0.20004, 0.20006], np.float32)}
  np.testing.assert_array_equal(anp.keep_above(values, 0.2)["c"], [0, 1, 1])
  np.testing.assert_array_equal(anp.keep_above(anp.as_written(values), 0.2)["c"], [0, 0, 1])


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


def test_sweep_and_choice_as_backdoorbench_anp_py():
  """evaluate_by_threshold's levels (np.arange(0, max + step, step), cumulative `<=`),
  evaluate_by_number's (start + ceil(step)), and the choice: lowest ASR below the unpruned
  model's among levels whose relative CA change is below acc_ratio."""
  values = {"a": np.array([0.0, 0.12, 0.9]), "b": np.array([0.05, 0.5])}
  thresholds, keeps = anp.sweep_levels(values, pruning_by="threshold", pruning_max=0.2,
                                       pruning_step=0.1)
  # np.arange(0, 0.2 + 0.1, 0.1) has a fourth element, 0.3 (float rounding), in both.
  np.testing.assert_allclose(thresholds, [0.0, 0.1, 0.2, 0.3])
  assert [anp.num_pruned(k) for k in keeps] == [1, 2, 3, 3]
  np.testing.assert_array_equal(keeps[2]["a"], [0, 0, 1])
  thresholds, _ = anp.sweep_levels(values, pruning_by="threshold", pruning_max=0.9,
                                   pruning_step=0.05)
  assert len(thresholds) == 19 and thresholds[-1] == pytest.approx(0.9)
  counts, keeps = anp.sweep_levels(values, pruning_by="number", pruning_max=3, pruning_step=2)
  np.testing.assert_array_equal(counts, [2, 4])  # start 0 and 2, each prunes start + 2.
  np.testing.assert_array_equal(keeps[1]["b"], [0, 0])
  counts, _ = anp.sweep_levels(values, pruning_by="number", pruning_max=10, pruning_step=4)
  np.testing.assert_array_equal(counts, [4, 5, 5])  # At most all 5 neurons.
  # CA reference 90: a relative change < 0.1 means CA in (81, 99).
  ca, asr = [89.0, 85.0, 80.0, 84.0, 83.0], [50.0, 20.0, 1.0, 20.0, 5.0]
  assert anp.choose_level(ca, asr, ca_reference=90.0, asr_reference=95.0, acc_ratio=0.1) == 4
  assert anp.choose_level(ca[:4], asr[:4], ca_reference=90.0, asr_reference=95.0,
                          acc_ratio=0.1) == 1  # Ties keep the first.
  assert anp.choose_level(ca, asr, ca_reference=90.0, asr_reference=4.0, acc_ratio=0.1) == -1
  assert anp.choose_level([70.0], [0.0], ca_reference=90.0, asr_reference=95.0,
                          acc_ratio=0.1) == -1


def test_sweep_selection_runs_on_the_clean_set_and_keeps_its_choice():
  """selection='sweep' evaluates every threshold's model on S under the defender's trigger and
  returns the level `choose_level` picks from those numbers (or the unpruned model)."""
  model = models.create("cnn", num_classes=4, width=0.125)
  variables = models.init(model, jax.random.key(0), (16, 16, 3))
  images = np.asarray(jax.random.randint(jax.random.key(1), (24, 16, 16, 3), 0, 256), np.uint8)
  labels = np.arange(24, dtype=np.int32) % 4
  trigger = attacks.patch((16, 16, 3), size=3, row=0, col=0, pattern=np.ones((3, 3, 3)))
  inputs = Inputs(model=model, variables=variables, images=images, labels=labels,
                  trigger=trigger, target=1, mode="all_to_one", layer="conv3_2", seed=0,
                  recipe=config_lib.base_config().train, eval_batch_size=24)
  values = anp.Settings(iterations=2, batch_size=8, learning_rate=2.0, selection="sweep",
                        pruning_max=0.9, pruning_step=0.3)
  record = DEFENSES["anp"].run(inputs, values)
  details = record.details
  np.testing.assert_allclose(details["levels"], [0.0, 0.3, 0.6, 0.9])
  assert details["chosen_level"] == anp.choose_level(
      details["CA_S"], details["ASR_defender"], ca_reference=details["CA_S_unpruned"],
      asr_reference=details["ASR_defender_unpruned"], acc_ratio=0.1)
  on_s = metrics.evaluate(model.apply, record.variables, images, labels, trigger, target=1,
                          mode="all_to_one", num_classes=4, batch_size=24)
  chosen = details["chosen_level"]
  assert on_s["CA"] == pytest.approx(details["CA_S"][chosen] if chosen >= 0
                                     else details["CA_S_unpruned"], abs=1e-6)
  scales = np.concatenate([np.asarray(bn.scale(record.variables, n)) for n in bn.layer_names(
      variables)])
  assert record.pruned == int(np.sum(scales == 0.0))
