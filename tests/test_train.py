import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linfjax import config as config_lib
from linfjax import models
from linfjax import attacks
from linfjax.attacks import poison
from linfjax.training import train


def _quadrant_set(n=256, size=16, seed=0):
  """Four classes; class c brightens quadrant c of a noisy image. Linearly separable."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, n).astype(np.int32)
  images = rng.integers(0, 100, (n, size, size, 3)).astype(np.uint8)
  half = size // 2
  for i, c in enumerate(labels):
    r, q = divmod(int(c), 2)
    images[i, r * half:(r + 1) * half, q * half:(q + 1) * half] += 150
  return images, labels


def _recipe(epochs):
  cfg = config_lib.base_config().train
  cfg.epochs, cfg.batch_size, cfg.learning_rate, cfg.crop_padding, cfg.flip = epochs, 32, 0.05, 0, False
  return cfg


def _fit(images, labels, cfg, trigger, key=0):
  model = models.create("cnn", num_classes=4, width=0.125)
  variables = models.init(model, jax.random.key(key), images.shape[1:])
  total = cfg.epochs * train.steps_per_epoch(len(labels), cfg.batch_size)
  state = train.create_state(model, variables, train.make_optimizer(cfg, total))
  data = train.to_device(poison.clean(images, labels))
  state = train.fit(state, data, trigger, train.Recipe.from_config(cfg), key=jax.random.key(1))
  return model, state


def test_training_reaches_high_accuracy_on_separable_data():
  images, labels = _quadrant_set()
  test_images, test_labels = _quadrant_set(seed=1)
  trigger = attacks.patch((16, 16, 3), size=2, row=14, col=14, pattern=np.ones(3))
  model, state = _fit(images, labels, _recipe(4), trigger)
  logits, _ = model.apply(train.variables(state), test_images.astype(np.float32) / 255.0)
  accuracy = float(np.mean(np.argmax(logits, -1) == test_labels))
  assert accuracy >= 0.95, accuracy


def test_non_finite_loss_names_the_step():
  images, labels = _quadrant_set(n=96)
  cfg = _recipe(2)
  model = models.create("cnn", num_classes=4, width=0.125)
  variables = models.init(model, jax.random.key(0), (16, 16, 3))
  state = train.create_state(model, variables, train.make_optimizer(cfg, 6))
  trigger = attacks.patch((16, 16, 3), size=2, row=14, col=14, pattern=np.ones(3))
  recipe = train.Recipe.from_config(cfg)
  data = train.to_device(poison.clean(images, labels))
  state = train.fit(state, data, trigger, dataclasses.replace(recipe, epochs=1),
                    key=jax.random.key(0))
  # A head bias of NaN makes every later loss NaN: the first bad step is 3 (epoch 1).
  head = dict(state.params["head"], bias=state.params["head"]["bias"] * jnp.nan)
  state = state.replace(params=dict(state.params, head=head))
  with pytest.raises(train.TrainingDiverged, match=r"at step 3 \(epoch 1\).*learning_rate"):
    train.fit(state, data, trigger, recipe, key=jax.random.key(0), start_epoch=1)


def test_augment_identity_flip_and_crop():
  images = jax.random.uniform(jax.random.key(0), (8, 6, 6, 3))
  key = jax.random.key(1)
  np.testing.assert_array_equal(train.augment(key, images, padding=0, flip=False), images)
  flipped = np.asarray(train.augment(key, images, padding=0, flip=True))
  for out, image in zip(flipped, np.asarray(images)):
    assert np.array_equal(out, image) or np.array_equal(out, image[:, ::-1])
  assert not np.array_equal(flipped, images)
  cropped = np.asarray(train.augment(key, images, padding=2, flip=False))
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
  for out, image in zip(cropped, padded):
    matches = [(dy, dx) for dy in range(5) for dx in range(5)
               if np.array_equal(out, image[dy:dy + 6, dx:dx + 6])]
    assert matches, "every crop is a 6x6 window of the padded image"


def test_epochs_are_shuffled_reproducibly():
  a = train.epoch_batches(jax.random.key(3), 100, 32)
  b = train.epoch_batches(jax.random.key(3), 100, 32)
  assert a.shape == (3, 32)
  np.testing.assert_array_equal(a, b)
  assert len(np.unique(np.asarray(a))) == 96


def test_weight_decay_and_momentum_match_torch_sgd_by_hand():
  cfg = _recipe(1)
  cfg.learning_rate, cfg.momentum, cfg.weight_decay = 0.1, 0.9, 0.01
  tx = train.make_optimizer(cfg, total_steps=1000)
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([0.5, 0.5])}
  opt_state = tx.init(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  # torch.optim.SGD: d = g + wd * p; buf = d; p -= lr * buf (lr at step 0 of the cosine).
  expected = -0.1 * (np.array([0.5, 0.5]) + 0.01 * np.array([1.0, -2.0]))
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)
