"""TrojanNN: neuron choice, loss and signed steps against NumPy on a toy feature map, and the
attack made on a run's vanilla model through the registry."""

import jax.numpy as jnp
import numpy as np
import pytest

from linfjax import attacks, config as config_lib
from linfjax.attacks import trojannn
from linfjax.runs import pipeline
from linfjax.settings import ConfigError
from test_pipeline import tiny_config

SHAPE = (8, 8, 3)
# On the white square, channel k's pre-activation is sum_c W[c, k] + b[k]: all alive but the
# last, whose |W| is largest; the live ones' sum_c |W[c, k]| are 0.9, 1.0, 1.2, 1.3.
WEIGHTS = np.array([[0.5, -0.3, 0.9, 0.2, -0.8],
                    [0.1, 0.4, -0.2, 0.6, -0.7],
                    [0.3, 0.3, 0.1, -0.5, -0.6]])
BIAS = np.array([0.1, 0.2, 0.0, 0.3, 0.5])


def _features(images):
  """A toy last conv map: a per-pixel linear map to 5 channels, then ReLU."""
  return jnp.maximum(images @ jnp.asarray(WEIGHTS, jnp.float32)
                     + jnp.asarray(BIAS, jnp.float32)[None, None, None], 0.0)


def _numpy_terms(pattern, mask, images):
  """(pre-activations z [B, H, W, K], channel means a [B, K]) of the stamped images."""
  stamped = (1 - mask) * images + mask * pattern
  z = stamped @ WEIGHTS + BIAS
  return z, np.maximum(z, 0).mean(axis=(1, 2))


def _numpy_sensitivity(pattern, mask, images):
  z, _ = _numpy_terms(pattern, mask, images)
  height, width = SHAPE[:2]
  # d mean_{b,h,w} relu(z_k) / d p[h, w, c] = mean_b 1[z > 0] W[c, k] m[h, w] / (H W)
  grad = np.einsum("bhwk,ck->khwc", (z > 0).astype(float), WEIGHTS) * mask[None]
  return np.abs(grad / (len(images) * height * width)).sum(axis=(1, 2, 3))


def _numpy_loss_grad(pattern, mask, images, neurons, target):
  z, means = _numpy_terms(pattern, mask, images)
  residual = target - means[:, neurons]                                  # [B, n]
  loss = np.mean(np.sum(residual ** 2, axis=1))
  active = (z[..., neurons] > 0).astype(float)                           # [B, H, W, n]
  per_pixel = np.einsum("bn,bhwn,cn->hwc", -2 * residual, active, WEIGHTS[:, neurons])
  return loss, per_pixel * mask / (len(images) * SHAPE[0] * SHAPE[1])


def _toy_trigger(**overrides):
  values = trojannn.Settings(**{**dict(trojannn_size=3, trojannn_margin=1), **overrides})
  return trojannn.build(values, SHAPE)


def _images(count=6, seed=1):
  return np.random.default_rng(seed).random((count, *SHAPE))


def test_the_square_sits_where_backdoorbenchs_square_mask_does():
  built = attacks.from_config(_trigger_config(**attacks.PRESETS["trojannn"]), (32, 32, 3))
  rows, cols = np.nonzero(np.asarray(attacks.region(built)))
  # resource/trojannn/square.png resized to 32x32: rows and columns 20..29, white.
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (20, 29, 20, 29)
  assert np.all(np.asarray(built.pattern)[20:30, 20:30] == 1.0)
  top_left = _toy_trigger(trojannn_position="top_left", trojannn_margin=2)
  assert np.argwhere(np.asarray(top_left.mask[..., 0]))[0].tolist() == [2, 2]


def test_neuron_choice_and_loss_match_numpy():
  trigger, images = _toy_trigger(), _images()
  mask, pattern = np.asarray(trigger.mask, float), np.asarray(trigger.pattern, float)
  expected = _numpy_sensitivity(pattern, mask, images)
  got = np.asarray(trojannn.sensitivity(_features, trigger, jnp.asarray(images, jnp.float32)))
  np.testing.assert_allclose(got, expected, rtol=1e-4)
  np.testing.assert_allclose(expected, np.array([0.9, 1.0, 1.2, 1.3, 0.0]) * 9 / 64)
  chosen = trojannn.select_neurons(_features, trigger, jnp.asarray(images, jnp.float32), 2)
  np.testing.assert_array_equal(chosen, [3, 2])  # the dead channel is not chosen
  loss = trojannn.neuron_loss(_features, trigger, jnp.asarray(images, jnp.float32), chosen, 4.0)
  np.testing.assert_allclose(float(loss), _numpy_loss_grad(pattern, mask, images, chosen, 4.0)[0],
                             rtol=1e-5)
  with pytest.raises(attacks.TriggerError, match="trojannn_neurons 6 is more than the 5"):
    trojannn.select_neurons(_features, trigger, jnp.asarray(images, jnp.float32), 6)


def test_signed_steps_match_numpy_and_stay_in_the_square():
  trigger, images, neurons = _toy_trigger(), _images(), np.array([1, 4])
  mask, start = np.asarray(trigger.mask, float), np.asarray(trigger.pattern, float)
  pattern = start.copy()
  for _ in range(3):
    _, grad = _numpy_loss_grad(pattern, mask, images, neurons, 4.0)
    moved = np.clip(np.clip(pattern - 0.1 * np.sign(grad), start - 0.25, start + 0.25), 0, 1)
    pattern = np.where(mask > 0, moved, pattern)
  got = trojannn.optimise_pattern(_features, trigger, jnp.asarray(images, jnp.float32), neurons,
                                  target_value=4.0, steps=3, step_size=0.1, epsilon=0.25)
  np.testing.assert_allclose(np.asarray(got.pattern), pattern, atol=1e-6)
  assert np.abs(pattern - start).max() == pytest.approx(0.25)  # the epsilon bound bites
  np.testing.assert_array_equal(np.asarray(got.mask), mask)
  # Long, large steps: pixels stay in [0, 1], nothing changes outside the square.
  far = trojannn.optimise_pattern(_features, trigger, jnp.asarray(images, jnp.float32), neurons,
                                  target_value=50.0, steps=25, step_size=0.7, epsilon=1.0)
  far = np.asarray(far.pattern)
  assert far.min() >= 0.0 and far.max() <= 1.0 and np.abs(far - start).max() > 0.5
  np.testing.assert_array_equal(far[mask[..., 0] == 0], start[mask[..., 0] == 0])
  stamped = np.asarray(attacks.apply(trigger._replace(pattern=jnp.asarray(far)),
                                     jnp.asarray(images, jnp.float32)))
  np.testing.assert_array_equal(stamped[:, mask[..., 0] == 0],
                                np.float32(images)[:, mask[..., 0] == 0])


def _trigger_config(**overrides):
  block = config_lib.base_config().trigger
  block.update(overrides)
  return block


def test_bad_values_are_one_line_errors():
  with pytest.raises(ConfigError, match=r"config\.trigger\.trojannn_steps: must be an integer "
                                        r">= 1, got 0"):
    attacks.check(_trigger_config(kind="trojannn", trojannn_steps=0), None)
  with pytest.raises(ConfigError, match=r"config\.trigger\.trojannn_size: a 10x10 square 2 "
                                        r"pixels in from the edges does not fit a 8x8 image"):
    attacks.check_data(_trigger_config(kind="trojannn"), SHAPE)
  # Another kind's run does not check TrojanNN's fields.
  attacks.check(_trigger_config(kind="patch", trojannn_steps=0), None)


def test_the_attack_is_made_on_the_vanilla_model(cifar_dir, tmp_path, monkeypatch):
  seen = {}
  real_select = trojannn.select_neurons

  def select(features, trigger, images, count):
    seen.update(features=features, images=images, neurons=real_select(features, trigger,
                                                                      images, count))
    return seen["neurons"]

  monkeypatch.setattr(trojannn, "select_neurons", select)
  config = tiny_config(cifar_dir, epochs=1)
  config.stages = ("train",)
  config.trigger.update(attacks.PRESETS["trojannn"])
  config.trigger.update(trojannn_size=6, trojannn_steps=15, trojannn_images=12,
                        trojannn_step_size=0.05)
  workdir = str(tmp_path / "run")
  results = pipeline.run(config, workdir, progress=False)

  assert results["train"]["poisoned"] == 16 and len(seen["images"]) == 12
  prepared = pipeline.make_context(config, workdir, progress=False).trigger
  built = attacks.from_config(config.trigger, (32, 32, 3))
  np.testing.assert_array_equal(np.asarray(prepared.mask), np.asarray(built.mask))
  inside = np.asarray(built.mask[..., 0]) > 0
  change = np.abs(np.asarray(prepared.pattern) - np.asarray(built.pattern))
  assert change[inside].max() > 0.0 and change[~inside].max() == 0.0
  assert change.max() <= 0.3 + 1e-6 and np.asarray(prepared.pattern).min() >= 0.0
  means = lambda trigger: np.asarray(trojannn.channel_means(
      seen["features"], trigger, seen["images"]))[:, seen["neurons"]].mean(axis=0)
  assert np.all(means(prepared) > means(built)), (means(prepared), means(built))
