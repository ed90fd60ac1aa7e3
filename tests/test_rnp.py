"""RNP's unlearning and mask recovery against NumPy on a one-batch-norm model; through DEFENSES."""

import jax
import numpy as np
import pytest

from test_anp import EPS, OneNorm, _reference

from linfjax import attacks, keys, models
from linfjax import config as config_lib
from linfjax.defenses import DEFENSES, bn, rnp
from linfjax.defenses.anp_pruning import as_written
from linfjax.defenses.base import Inputs

NO_AUGMENTATION = (0, False, "zeros")


def _one_norm(seed=0):
  """OneNorm with set scales and biases, 6 uint8 images and labels; x = images / 255."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (6, 3, 3, 4), dtype=np.uint8)
  model = OneNorm()
  variables = model.init(jax.random.key(seed), images.astype(np.float32) / 255)
  params = jax.tree.map(np.asarray, dict(variables["params"]))
  params["BatchNorm_0"] = {"scale": rng.uniform(0.5, 1.5, 4).astype(np.float32),
                           "bias": rng.normal(size=4).astype(np.float32)}
  params["Dense_0"] = {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
                       "bias": rng.normal(size=3).astype(np.float32) * 0.1}
  return model, {**variables, "params": params}, images, images.astype(np.float64) / 255


def _forward(params, x):
  """Pooled features, logits and softmax of OneNorm in training mode, in float64."""
  mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  xhat = ((x - mean) / np.sqrt(var + EPS)).mean(axis=(1, 2))
  pooled = params["BatchNorm_0"]["scale"] * xhat + params["BatchNorm_0"]["bias"]
  logits = pooled @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
  p = np.exp(logits - logits.max(1, keepdims=True))
  return pooled, logits, p / p.sum(1, keepdims=True)


def _gradients(params, x, labels):
  """d CE / d every parameter, by hand (the batch-norm ones through test_anp's _reference)."""
  variables = {"params": params}
  _, d_scale, d_bias = _reference(variables, x, labels, np.ones(4), np.ones(4))
  pooled, _, p = _forward(params, x)
  dlogits = (p - np.eye(3)[labels]) / len(labels)
  return {"BatchNorm_0": {"scale": d_scale / params["BatchNorm_0"]["scale"],
                          "bias": d_bias / params["BatchNorm_0"]["bias"]},
          "Dense_0": {"kernel": pooled.T @ dlogits, "bias": dlogits.sum(0)}}


def _unlearn_by_hand(params, x, labels, *, lr, epochs, threshold, milestones=(10, 20)):
  """Full-batch gradient ascent: SGD momentum 0.9 on -grad + 5e-4 w, lr x0.1 after epochs 10
  and 20, stopping once the epoch's (pre-update) accuracy is <= threshold."""
  params = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  velocity = jax.tree.map(np.zeros_like, params)
  for epoch in range(epochs):
    accuracy = np.mean(np.argmax(_forward(params, x)[1], 1) == labels)
    rate = lr * 0.1 ** sum(epoch >= m for m in milestones)
    grads = _gradients(params, x, labels)
    velocity = jax.tree.map(lambda v, g, w: 0.9 * v - g + 5e-4 * w, velocity, grads, params)
    params = jax.tree.map(lambda w, v: w - rate * v, params, velocity)
    if accuracy <= threshold:
      return params, epoch + 1, accuracy
  return params, epochs, accuracy


def test_unlearning_is_gradient_ascent_with_the_references_schedule():
  model, variables, images, x = _one_norm()
  labels = np.argmax(_forward(jax.tree.map(np.float64, variables["params"]), x)[1], 1)
  labels = labels.astype(np.int32)  # Every prediction right: accuracy 1 at the start.
  values = rnp.Settings(unlearning_lr=0.05, unlearning_epochs=12, clean_threshold=0.0,
                        batch_size=6)
  got, details = rnp.unlearn(model, variables, images, labels, values,
                             augmentation=NO_AUGMENTATION, key=jax.random.key(1))
  want, epochs, accuracy = _unlearn_by_hand(variables["params"], x, labels, lr=0.05, epochs=12,
                                            threshold=0.0)
  assert details["unlearning_epochs_run"] == epochs
  assert details["unlearned_accuracy_S"] == pytest.approx(accuracy)
  for path, value in jax.tree_util.tree_leaves_with_path(want):  # Compare the moves.
    start = _leaf(variables["params"], path)
    np.testing.assert_allclose(_leaf(got["params"], path) - start, value - start,
                               rtol=2e-3, atol=1e-6)
  # The loss went up (ascent) and the milestone at epoch 10 mattered.
  ce = lambda params: -np.mean(np.log(_forward(params, x)[2][np.arange(6), labels]))
  assert ce(want) > ce(jax.tree.map(np.float64, variables["params"])) + 0.1
  no_milestone, _, _ = _unlearn_by_hand(variables["params"], x, labels, lr=0.05, epochs=12,
                                        threshold=0.0, milestones=())
  assert not np.allclose(want["Dense_0"]["kernel"], no_milestone["Dense_0"]["kernel"],
                         rtol=1e-2)
  # It stops after the first epoch whose accuracy is at or below the threshold.
  _, stopped = rnp.unlearn(model, variables, images, labels,
                           rnp.Settings(clean_threshold=1.0, batch_size=6),
                           augmentation=NO_AUGMENTATION, key=jax.random.key(1))
  assert stopped == {"unlearning_epochs_run": 1, "unlearned_accuracy_S": 1.0,
                     "reached_clean_threshold": True}


def _leaf(tree, path):
  for entry in path:
    tree = tree[entry.key]
  return np.asarray(tree, np.float64)


def test_mask_recovery_matches_numpy():
  """Masks m on the scales, SGD momentum 0.9 at lr 0.5 on 0.2 * CE, clipped to [0, 1]."""
  model, variables, images, x = _one_norm(3)
  labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
  values = rnp.Settings(recovering_lr=0.5, recovering_epochs=4, alpha=0.2, batch_size=6)
  got = rnp.recover(model.apply, variables, images, labels, values,
                    augmentation=NO_AUGMENTATION, key=jax.random.key(0))
  m, velocity = np.ones(4), np.zeros(4)
  for _ in range(4):
    _, d_mask, _ = _reference(variables, x, labels, m, np.ones(4))
    velocity = 0.9 * velocity + 0.2 * d_mask
    m = np.clip(m - 0.5 * velocity, 0.0, 1.0)
  assert list(got) == ["BatchNorm_0"]
  np.testing.assert_allclose(got["BatchNorm_0"], m, rtol=1e-4, atol=1e-6)
  assert np.any(m == 1.0) and np.any(m < 0.9)  # Both the clip and the learning show.


def test_recovery_needs_batch_norm_and_counts_are_checked():
  model, variables, images, _ = _one_norm()
  with pytest.raises(ValueError, match="rnp learns masks on batch-norm neurons; this model"):
    rnp.recover(model.apply, {"params": variables["params"]}, images, np.zeros(6, np.int32),
                rnp.Settings(), augmentation=NO_AUGMENTATION, key=jax.random.key(0))
  masks = {"BatchNorm_0": np.array([0.5, 0.1, 0.9, 0.3])}
  with pytest.raises(ValueError, match="cannot prune 5 of 4 batch-norm neurons"):
    rnp.prune(variables, masks, rnp.Settings(pruning_by="number", pruning_number=5))
  keep, pruned = rnp.prune(variables, masks, rnp.Settings(pruning_by="number", pruning_number=2))
  np.testing.assert_array_equal(keep["BatchNorm_0"], [1, 0, 1, 0])
  np.testing.assert_array_equal(np.asarray(bn.scale(pruned, "BatchNorm_0"))[[1, 3]], [0, 0])


def test_rnp_through_the_registry():
  model = models.create("cnn", num_classes=4, width=0.125)
  variables = models.init(model, jax.random.key(0), (16, 16, 3))
  rng = np.random.default_rng(0)
  inputs = Inputs(model=model, variables=variables,
                  images=rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8),
                  labels=np.arange(64, dtype=np.int32) % 4,
                  trigger=attacks.patch((16, 16, 3), size=2, row=0, col=0,
                                        pattern=np.ones((2, 2, 3))),
                  target=1, mode="all_to_one", layer="conv3_2", seed=0,
                  recipe=config_lib.base_config().train)
  values = rnp.Settings(unlearning_epochs=2, recovering_epochs=3, batch_size=32)
  # The masks the defense recovers, by its own stages and keys.
  recipe = inputs.recipe
  augmentation = (recipe.crop_padding, bool(recipe.flip), recipe.padding_mode)
  unlearn_key, recover_key = jax.random.split(keys.run_key(0, keys.RNP))
  unlearned, _ = rnp.unlearn(model, variables, inputs.images, inputs.labels, values,
                             augmentation=augmentation, key=unlearn_key)
  masks = as_written(rnp.recover(model.apply, unlearned, inputs.images, inputs.labels, values,
                                 augmentation=augmentation, key=recover_key))
  flat = np.concatenate(list(masks.values()))
  assert flat.min() >= 0.0 and flat.max() <= 1.0 and flat.min() < 0.99
  threshold = float(np.quantile(flat, 0.25))
  values = rnp.Settings(unlearning_epochs=2, recovering_epochs=3, batch_size=32,
                        threshold=threshold)
  record = DEFENSES["rnp"].run(inputs, values)
  assert record.masks is None and record.pruned == int(np.sum(flat <= threshold)) > 0
  assert record.details["pruned_per_layer"] == {n: int(np.sum(m <= threshold))
                                                for n, m in masks.items()}
  assert record.details["unlearning_epochs_run"] in (1, 2)
  for name, mask in masks.items():  # The original model, its pruned scales zero, biases kept.
    scale = np.asarray(bn.scale(record.variables, name))
    np.testing.assert_array_equal(scale == 0, mask <= threshold)
    np.testing.assert_array_equal(scale[mask > threshold],
                                  np.asarray(bn.scale(variables, name))[mask > threshold])
    np.testing.assert_array_equal(bn.bias(record.variables, name), bn.bias(variables, name))
  assert "rnp" in config_lib.base_config().prune and DEFENSES["rnp"].needs_trigger is False
