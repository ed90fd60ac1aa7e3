"""ABL (linfjax/training/abl.py): its objectives, the isolation, the step's objective hook,
and its model beside the run's two in the train stage."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from linfjax import attacks, models
from linfjax import config as config_lib
from linfjax.runs import pipeline
from linfjax.training import abl, train
from test_pipeline import tiny_config


def test_objectives_hold_the_loss_at_gamma():
  for loss, flooded, lga in [(0.2, 0.8, -0.2), (0.9, 0.9, 0.9), (0.5, 0.5, 0.0)]:
    assert float(abl.objective("flooding", 0.5)(jnp.float32(loss))) == pytest.approx(flooded)
    assert float(abl.objective("lga", 0.5)(jnp.float32(loss))) == pytest.approx(lga)
  # Below gamma both climb: the gradient with respect to the loss is -1.
  assert float(jax.grad(abl.objective("flooding", 0.5))(0.2)) == -1.0
  assert float(jax.grad(abl.objective("lga", 0.5))(0.2)) == -1.0
  assert float(jax.grad(abl.objective("lga", 0.5))(0.9)) == 1.0


def test_isolate_takes_the_lowest_losses():
  losses = np.array([0.5, 0.01, 2.0, 0.02, 0.3, 0.001, 1.0, 0.7, 0.9, 0.4])
  np.testing.assert_array_equal(abl.isolate(losses, 0.3), [1, 3, 5])
  np.testing.assert_array_equal(abl.isolate(losses, 0.01), [5])  # At least one.


def _tiny_model():
  model = models.create("cnn", num_classes=3, width=0.125)
  return model, models.init(model, jax.random.key(0), (8, 8, 3))


def test_gradient_ascent_objective_reverses_the_step():
  """Plain SGD: the update under `negated` is minus the cross-entropy's update."""
  model, variables = _tiny_model()
  rng = np.random.default_rng(0)
  data = train.DeviceData(jnp.asarray(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)),
                          jnp.array([0, 1, 2, 0], jnp.int32), jnp.zeros(4, bool),
                          jnp.zeros(4, bool))
  trigger = attacks.patch((8, 8, 3), size=2, row=0, col=0, pattern=np.ones((2, 2, 3)))
  moved = {}
  for name, objective in [("descent", None), ("ascent", abl.negated)]:
    state = train.create_state(model, jax.tree.map(jnp.array, variables), optax.sgd(0.1))
    new, step_metrics = train.train_step(state, data, jnp.arange(4), trigger, jax.random.key(1),
                                         padding=0, flip=False, objective=objective)
    moved[name] = jax.tree.map(lambda a, b: np.asarray(a - b), new.params, state.params)
    moved[name + " loss"] = float(step_metrics["loss"])
  assert moved["descent loss"] == pytest.approx(moved["ascent loss"])  # Both report the CE.
  for up, down in zip(jax.tree.leaves(moved["ascent"]), jax.tree.leaves(moved["descent"])):
    np.testing.assert_allclose(up, -down, atol=1e-7)
  assert any(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(moved["descent"]))


def test_example_losses_stamp_as_training_does():
  model, variables = _tiny_model()
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
  labels = np.array([0, 1, 2, 0, 1], np.int32)
  stamp = np.array([False, True, False, True, False])
  trigger = attacks.patch((8, 8, 3), size=3, row=5, col=5, pattern=np.ones((3, 3, 3)))
  data = train.DeviceData(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(stamp),
                          jnp.zeros(5, bool))
  got = abl.example_losses(model, variables, data, trigger, key=jax.random.key(0), batch_size=2)
  x = images.astype(np.float32) / 255.0
  x[stamp, 5:, 5:, :] = 1.0
  logits = np.asarray(model.apply(variables, jnp.asarray(x))[0], np.float64)
  expected = np.log(np.exp(logits).sum(1)) - logits[np.arange(5), labels]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_train_stage_trains_abl_beside_the_two_models_and_resumes(cifar_dir, tmp_path,
                                                                  monkeypatch):
  config = tiny_config(cifar_dir)
  config.stages = ("train",)
  config.abl.update(enabled=True, isolation_epochs=1, finetuning_epochs=2, unlearning_epochs=1,
                    isolation_ratio=0.1)
  workdir = str(tmp_path / "run")
  result = pipeline.run(config, workdir, progress=False)["train"]["abl"]
  assert result["isolated"] == 8  # 10 % of the 80 training images.
  assert 0 <= result["isolated_poisoned"] <= 8
  assert set(result) == {"CA", "ASR", "RA", "DER", "isolated", "isolated_poisoned"}
  assert 0.0 <= result["CA"] <= 100.0 and 0.0 <= result["DER"] <= 100.0
  # A rerun whose results.json lost the stage restores ABL's model instead of training it.
  (tmp_path / "run" / "results.json").unlink()
  monkeypatch.setattr(abl, "anti_backdoor_learning", lambda *a, **k: pytest.fail("retrained"))
  monkeypatch.setattr(train, "fit", lambda state, *a, **k: state)  # The two models: untouched.
  again = pipeline.run(config, workdir, progress=False)["train"]["abl"]
  assert again["isolated_poisoned"] == result["isolated_poisoned"]


@pytest.mark.parametrize("field,value,message", [
    ("isolation_ratio", 1.5, r"abl.isolation_ratio"),
    ("ascent", "sgd", r"abl.ascent: unknown value 'sgd'; known: flooding, lga"),
    ("unlearning_epochs", 0, r"abl.unlearning_epochs"),
])
def test_bad_abl_settings_are_one_line_errors(field, value, message):
  config = config_lib.base_config()
  config.abl[field] = value
  with pytest.raises(config_lib.ConfigError, match=message) as raised:
    config_lib.validate(config)
  assert "\n" not in str(raised.value)
