"""The attacks' poisoning reaches training: the train stage's sets and the step's noise mode."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from linfjax import attacks, keys
from linfjax import config as config_lib
from linfjax.runs import pipeline
from linfjax.training import train
from linfjax.runs.stages import train as train_stage
from test_pipeline import tiny_config


@pytest.mark.parametrize("preset,mode", [("sig", "all_to_one"), ("wanet", "all_to_all")])
def test_train_stage_sets_follow_the_attack(cifar_dir, tmp_path, preset, mode):
  config = tiny_config(cifar_dir)
  config.trigger.update(config_lib.TRIGGER_PRESETS[preset])
  config.trigger.grid_size = 2
  config.poison.update(mode=mode, rate=0.02)
  ctx = pipeline.make_context(config, str(tmp_path / "run"))
  sets = train_stage.training_sets(ctx)
  backdoored, labels = sets["backdoored"], ctx.train_labels
  chosen = backdoored.poison_indices
  assert len(chosen) == 2 and not sets["vanilla"].noise_mode.any()
  if preset == "sig":  # Clean-label: target-class images, labels kept, no noise mode.
    assert np.all(labels[chosen] == 0) and np.array_equal(backdoored.labels, labels)
    assert len(backdoored.noise_indices) == 0
  else:  # All-to-all labels and cross_ratio 2: four noise-mode examples with their labels.
    np.testing.assert_array_equal(backdoored.labels[chosen], (labels[chosen] + 1) % 10)
    assert len(backdoored.noise_indices) == 4
    noise = backdoored.noise_indices
    np.testing.assert_array_equal(backdoored.labels[noise], labels[noise])


def test_train_step_warps_noise_mode_examples_with_fresh_noise():
  """A linear model, so the step's reported loss is a NumPy function of the images it saw."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
  labels = np.array([0, 1, 2, 0], np.int32)
  weights = jnp.asarray(rng.normal(size=(6 * 6 * 3, 3)), jnp.float32)
  apply_fn = lambda variables, x, train, mutable: (
      (x.reshape(x.shape[0], -1) @ variables["params"]["w"], {}), {"batch_stats": {}})
  trigger = attacks.wanet.wanet((6, 6, 3), grid_size=2, strength=2.0, seed=0)
  key = jax.random.key(3)
  noise = np.array([False, True, False, True])
  data = train.DeviceData(jnp.asarray(images), jnp.asarray(labels), jnp.zeros(4, bool),
                          jnp.asarray(noise))
  state = train.TrainState.create(apply_fn=apply_fn, params={"w": weights}, batch_stats={},
                                  tx=optax.sgd(0.0))
  _, step_metrics = train.train_step(state, data, jnp.arange(4), trigger, key, padding=0,
                                     flip=False)
  x = images.astype(np.float32) / 255.0
  step_key = jax.random.fold_in(jax.random.fold_in(key, 0), keys.NOISE_MODE)
  seen = np.where(noise[:, None, None, None],
                  np.asarray(attacks.apply_noise_mode(trigger, jnp.asarray(x), step_key)), x)
  logits = seen.reshape(4, -1) @ np.asarray(weights)
  expected = np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(4), labels])
  np.testing.assert_allclose(step_metrics["loss"], expected, rtol=1e-5)
  clean_logits = x.reshape(4, -1) @ np.asarray(weights)
  clean_loss = np.mean(np.log(np.exp(clean_logits).sum(1)) - clean_logits[np.arange(4), labels])
  assert abs(float(step_metrics["loss"]) - clean_loss) > 1e-3
