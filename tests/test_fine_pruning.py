"""Fine-Pruning (Liu et al. 2018): its ranking by the clean mean activation, its stop rules
(linfjax's absolute CA drop and BackdoorBench fp.py's relative one), fp.py's pruning grid, and
the fine-tuning after it, which keeps the pruned channels at zero."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linfjax import attacks, models
from linfjax.defenses import fine_pruning
from linfjax.defenses import pruning as prune
from linfjax.detection import norms
from linfjax.training import finetune


@pytest.mark.parametrize("ca, expected", [
    ([80, 80, 79, 78, 76.9, 79.5], 3),  # Stops before the first drop beyond 3 points.
    ([80, 79, 78, 77.5, 77], 4),  # Never beyond: the most pruned level.
    ([80, 70, 80], 0),  # The first level already drops too far.
])
def test_fine_pruning_prunes_until_the_clean_accuracy_drops(ca, expected):
  assert prune.fine_pruning_level(ca, ca_reference=ca[0], delta=3.0) == expected


def apply_fn_model(apply_fn):
  """A stand-in with the `apply` a shape query needs."""
  return type("Model", (), {"apply": staticmethod(apply_fn)})


def test_fine_pruning_ranks_by_clean_mean_smallest_first():
  weights = jnp.asarray([0.5, 0.0, 2.0, 0.1, 1.0])
  spike = jnp.asarray([0.0, 0.0, 0.0, 5.0, 0.0])  # Fires on the trigger's pixel only.

  def apply_fn(variables, x, stop=None):
    activation = (x[..., :1] * weights[None, None, None]
                  + (x[..., 1:2] == 1.0) * spike[None, None, None])
    return (activation, {}) if stop else (jnp.zeros((x.shape[0], 2)), {"L": activation})

  images = np.asarray(jax.random.uniform(jax.random.key(5), (12, 4, 4, 3)) * 0.9, np.float32)
  trigger = attacks.patch((4, 4, 3), size=1, row=0, col=0, pattern=np.ones((1, 1, 3)))
  moments = norms.norm_statistics(apply_fn, {}, images, [trigger], batch_size=5,
                                  norms=norms.STATISTICS)["L"]
  assert prune.map_size(apply_fn_model(apply_fn), {}, (4, 4, 3), "L") == 16
  triggered = np.asarray(attacks.apply(trigger, images))
  for score in ("mean", "mean_abs"):  # A non-negative layer: both scores agree.
    clean_mean = prune.clean_mean_activation(moments, map_size=16, score=score)
    np.testing.assert_allclose(clean_mean, np.asarray(weights) * images[..., 0].mean(),
                               rtol=1e-5)
    np.testing.assert_array_equal(prune.ranking(clean_mean, largest_first=False),
                                  [1, 3, 0, 4, 2])
  for norm in ("linf", "l1"):
    assert prune.ranking(prune.scores_from_moments(moments, norm=norm))[0] == 3
  linf_shift = prune.scores_from_moments(moments, norm="linf", score="shift")
  expected = (np.asarray(weights) * triggered[..., 0].max((1, 2)).mean()
              + np.asarray(spike) - np.asarray(weights) * images[..., 0].max((1, 2)).mean())
  np.testing.assert_allclose(linf_shift, expected, rtol=1e-5, atol=1e-6)


def test_fine_pruning_ranks_by_the_signed_mean_as_fp_py():
  """BackdoorBench's fp.py ranks by the mean over S of the (pooled) activation with its sign
  (PreActResNet-18's last map has no ReLU), as the authors' conv_output_prune.py np.mean."""
  weights = jnp.asarray([0.5, -2.0, 0.2, -0.1])

  def apply_fn(variables, x):
    return None, {"L": (x[..., :1] - 0.5) * weights[None, None, None] + 0.1 * x[..., 1:2]}

  images = np.asarray(jax.random.uniform(jax.random.key(1), (10, 4, 4, 3)), np.float32)
  moments = norms.norm_statistics(apply_fn, {}, images, batch_size=4,
                                  norms=norms.STATISTICS)["L"]
  x = images.astype(np.float64)
  maps = (x[..., :1] - 0.5) * np.asarray(weights, np.float64) + 0.1 * x[..., 1:2]
  signed = prune.clean_mean_activation(moments, map_size=16)
  absolute = prune.clean_mean_activation(moments, map_size=16, score="mean_abs")
  np.testing.assert_allclose(signed, maps.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(absolute, np.abs(maps).mean(axis=(0, 1, 2)), rtol=1e-5)
  assert not np.array_equal(prune.ranking(signed, largest_first=False),
                            prune.ranking(absolute, largest_first=False))
  assert fine_pruning.Settings().score == "mean"


@pytest.mark.parametrize("ca, expected", [
    ([80, 80, 75, 72.5, 71.9, 79], 3),  # 71.9 moves by 10.1 % >= 10 %: the level before.
    ([80, 81, 87.5], 2),  # Up by 9.4 %: passes (|change|).
    ([80, 88.0, 60], 0),  # Up by exactly 10 %: stops (strict <, as fp.py).
])
def test_fine_pruning_stops_at_a_relative_ca_drop_as_fp_py(ca, expected):
  assert fine_pruning.relative_ca_drop_level(ca, ca_reference=ca[0], ratio=0.1) == expected


def test_fine_pruning_grid_of_fp_py_prunes_one_fewer():
  """fp.py: num_pruned in range(0, K, ceil(K * 0.01)) prunes seq_sort[0:num_pruned - 1]."""
  counts = fine_pruning.once_prune_ratio_counts(512, 0.01)
  np.testing.assert_array_equal(counts[:4], [0, 5, 11, 17])
  assert counts[-1] == 509 and len(counts) == 86
  np.testing.assert_array_equal(fine_pruning.once_prune_ratio_counts(10, 0.01), np.arange(9))
  np.testing.assert_array_equal(fine_pruning.once_prune_ratio_counts(16, 0.25), [0, 3, 7, 11])


def test_fine_tuning_keeps_pruned_channels_at_zero():
  model = models.create("cnn", num_classes=10, width=0.25, probe_layers=("conv3_2",))
  variables = models.init(model, jax.random.key(0), (32, 32, 3))
  images = np.asarray(jax.random.randint(jax.random.key(6), (32, 32, 32, 3), 0, 256), np.uint8)
  labels = np.asarray(jax.random.randint(jax.random.key(7), (32,), 0, 10), np.int32)
  mask = prune.masks(np.arange(32), [8])[0]  # Prunes channels 0..7 of conv3_2.
  recipe = finetune.Recipe(epochs=2, learning_rate=0.05, momentum=0.9, weight_decay=0.0,
                           batch_size=16, padding=4, flip=True)
  tuned = finetune.fine_tune(model, variables, images, labels, {"conv3_2": mask}, recipe,
                             key=jax.random.key(8))
  before = np.asarray(variables["params"]["conv3_2"]["Conv_0"]["kernel"])
  after = np.asarray(tuned["params"]["conv3_2"]["Conv_0"]["kernel"])
  # The mask is in the forward pass: no gradient reaches the pruned channels' weights.
  np.testing.assert_array_equal(after[..., :8], before[..., :8])
  assert np.abs(after[..., 8:] - before[..., 8:]).max() > 1e-4
  forward = jax.jit(lambda v, x, m: model.apply(v, x, m)[1]["conv3_2"])
  activation = np.asarray(forward(tuned, images.astype(np.float32) / 255, {"conv3_2": mask}))
  assert np.all(activation[..., :8] == 0.0) and np.any(activation[..., 8:] > 0)
