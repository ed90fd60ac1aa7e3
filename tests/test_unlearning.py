"""Neural Cleanse unlearning on a planted-trigger toy: the backdoor goes, clean accuracy stays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linfjax.training import finetune, metrics, train
from linfjax import models
from linfjax import attacks
from linfjax.attacks import poison
from linfjax import config as config_lib
from linfjax.defenses import DEFENSES, fine_tuning
from linfjax.defenses import nc_unlearning as unlearning
from linfjax.defenses.base import Inputs
from test_train import _quadrant_set, _recipe


def test_unlearning_set_stamps_a_share_and_keeps_labels():
  labels = np.arange(50, dtype=np.int32) % 5
  images = np.zeros((50, 4, 4, 3), np.uint8)
  result = unlearning.unlearning_set(images, labels, share=0.2, seed=3)
  assert result.stamp_after_augmentation.sum() == 10 and len(result.poison_indices) == 10
  np.testing.assert_array_equal(result.labels, labels)
  again = unlearning.unlearning_set(images, labels, share=0.2, seed=3)
  np.testing.assert_array_equal(result.poison_indices, again.poison_indices)


def test_unlearning_removes_a_planted_backdoor_and_keeps_accuracy():
  images, labels = _quadrant_set(n=384, seed=0)
  s_images, s_labels = _quadrant_set(n=128, seed=2)
  test_images, test_labels = _quadrant_set(n=256, seed=1)
  trigger = attacks.patch((16, 16, 3), size=4, row=6, col=6,
                           pattern=attacks.checkerboard_pattern(4, (1.0, 1.0, 1.0)))
  cfg = _recipe(6)
  model = models.create("cnn", num_classes=4, width=0.125)
  variables = models.init(model, jax.random.key(0), (16, 16, 3))
  total = cfg.epochs * train.steps_per_epoch(len(labels), cfg.batch_size)
  state = train.create_state(model, variables, train.make_optimizer(cfg, total))
  poisoned = poison.poison(images, labels, trigger, rate=0.2, target=0, mode="all_to_one",
                           stamp="after_augmentation", num_classes=4, seed=0)
  state = train.fit(state, train.to_device(poisoned), trigger, train.Recipe.from_config(cfg),
                    key=jax.random.key(1))
  evaluate = lambda v: metrics.evaluate(model.apply, v, test_images, test_labels, trigger,
                                        target=0, mode="all_to_one", num_classes=4,
                                        batch_size=128)
  before = evaluate(train.variables(state))
  assert before["CA"] >= 90.0 and before["ASR"] >= 90.0, before
  recipe = finetune.Recipe(epochs=4, learning_rate=0.02, momentum=0.9, weight_decay=5e-4,
                           batch_size=32, padding=0, flip=False)
  after = evaluate(unlearning.unlearn(model, train.variables(state), s_images, s_labels,
                                      trigger, recipe, key=jax.random.key(4)))
  assert after["ASR"] <= 10.0 and after["CA"] >= before["CA"] - 3.0, (before, after)
  # The same fine-tuning without the stamped share leaves the backdoor in place.
  plain = train.create_state(model, jax.tree.map(jnp.array, train.variables(state)),
                             train.make_optimizer(recipe, recipe.epochs * 4))
  plain = train.fit(plain, train.to_device(poison.clean(s_images, s_labels)), trigger,
                    train.Recipe(recipe.epochs, 32, 0, False), key=jax.random.key(5))
  assert evaluate(train.variables(plain))["ASR"] >= 80.0


def _inputs(flagged):
  model = models.create("cnn", num_classes=4, width=0.125)
  variables = models.init(model, jax.random.key(0), (16, 16, 3))
  trigger = attacks.patch((16, 16, 3), size=2, row=0, col=0, pattern=np.ones((2, 2, 3)))
  images, labels = np.zeros((10, 16, 16, 3), np.uint8), np.arange(10, dtype=np.int32) % 4
  return Inputs(model=model, variables=variables, images=images, labels=labels, trigger=trigger,
                target=1, mode="all_to_one", layer="conv3_2", seed=0,
                recipe=config_lib.base_config().train, flagged=flagged)


def test_only_flagged_leaves_the_model_unchanged_as_backdoorbench_nc_py(monkeypatch):
  """BackdoorBench's defense/nc.py returns the model as it is when no class is flagged
  (`flag == 0`); `only_flagged=True` does the same, the default unlearns anyway."""
  calls = []
  monkeypatch.setattr(unlearning, "unlearn", lambda *a, **k: calls.append(k) or {"new": 1})
  entry = DEFENSES["nc_unlearning"]
  settings = lambda only: (unlearning.Settings(only_flagged=only),
                           fine_tuning.Settings())
  record = entry.run(_inputs(False), settings(True))
  assert record.variables is None and record.pruned == 0 and not calls
  assert record.details["unlearned"] is False and record.details["flagged"] is False
  assert record.details["reason"] == unlearning.NOT_FLAGGED
  record = entry.run(_inputs(True), settings(True))
  assert record.variables == {"new": 1} and record.details["unlearned"] is True
  record = entry.run(_inputs(False), settings(False))  # linfjax's default: unlearns anyway.
  assert record.variables == {"new": 1} and len(calls) == 2
  assert calls[-1]["share"] == 0.2 and unlearning.Settings().only_flagged is False
  with pytest.raises(ValueError, match="Inputs.flagged"):
    entry.run(_inputs(None), settings(True))
