"""Neural Cleanse: the planted trigger is found, the schedule is NC's, vmap equals the loop,
and the stage resumes to the same result."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linfjax import models
from linfjax.detection import outliers, neural_cleanse as reverse
from linfjax.runs import pipeline
from linfjax import attacks
from linfjax.runs.stages import reverse as reverse_stage
from linfjax.runs.stages import train as train_stage
from test_pipeline import tiny_config

STRIPE = 3  # Columns per class stripe.
PATCH = 2  # The planted trigger: the bottom-right PATCH x PATCH square, white.


class PlantedModel:
  """A hand-built classifier whose minimal triggers are known.

  Class c's logit is 40 x the mean of stripe c (columns 3c..3c+2), so flipping an image
  to c takes brightening a good part of that stripe. With a backdoor, the target's logit
  gains up to 60 when the bottom-right 2x2 square (outside every stripe) is white: four
  pixels flip any image.
  """

  def __init__(self, num_classes, target=None):
    self.num_classes, self.target = num_classes, target

  def apply(self, variables, x):
    del variables
    stripes = [x[:, :, STRIPE * c:STRIPE * (c + 1)].mean(axis=(1, 2, 3))
               for c in range(self.num_classes)]
    logits = 40.0 * jnp.stack(stripes, axis=-1)
    if self.target is not None:
      patch = x[:, -PATCH:, -PATCH:].mean(axis=(1, 2, 3))
      logits = logits.at[:, self.target].add(60.0 * jax.nn.sigmoid(30.0 * (patch - 0.8)))
    return logits, {}


def _settings(**overrides):
  values = dict(steps=40, mini_batches=2, batch_size=10, learning_rate=0.1, init_cost=1e-3,
                reset_cost_to_zero=True, cost_multiplier=2.0, patience=4,
                attack_success_threshold=0.99, success_images=0, early_stop_threshold=1.0,
                early_stop_patience=8)
  values.update(overrides)
  return reverse.Settings(**values)


def _images(n, size, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def _assert_on_patch(mask):
  """The mask's largest value is in the planted patch, and its mass is there (the rest of
  the image keeps a thin residue: a sigmoid is never exactly 0)."""
  mask = np.asarray(mask).squeeze()
  outside = mask.copy()
  outside[-PATCH:, -PATCH:] = 0.0
  assert mask[-PATCH:, -PATCH:].max() > 0.9 > 0.2 > outside.max(), mask[-PATCH:, -PATCH:]
  assert mask[-PATCH:, -PATCH:].mean() > 20 * outside.mean()


def test_planted_trigger_is_recovered_and_flagged():
  model = PlantedModel(10, target=6)
  state = reverse.solve(model.apply, {}, _images(40, 32), num_classes=10,
                        key=jax.random.key(0), settings=_settings())
  outcome = reverse.result(state)
  assert outcome.succeeded.all()
  l1 = outcome.mask_l1
  assert np.argmin(l1) == 6 and l1[6] < 8.0 and np.min(np.delete(l1, 6)) > 2 * l1[6], l1
  _assert_on_patch(outcome.masks[6])
  on = outcome.masks[6][-PATCH:, -PATCH:] > 0.3
  assert np.all(outcome.patterns[6][-PATCH:, -PATCH:][on] > 0.8), "white where the mask is on"
  detection = outliers.detect(l1, outcome.succeeded)
  assert detection.flagged == detection.suspect == 6
  held_out = _images(50, 32, seed=1).astype(np.float32) / 255.0
  stamped = attacks.apply(outcome.trigger(6), held_out)
  # NC asks for 99 % success on S only; the smallest such mask mostly carries over.
  assert np.mean(np.argmax(model.apply({}, stamped)[0], -1) == 6) >= 0.8


@pytest.mark.parametrize("success_images", [0, 12])
def test_vmapped_solve_equals_per_class_loop(success_images):
  model = models.create("cnn", num_classes=4, width=0.125)
  variables = jax.jit(lambda key: models.init(model, key, (16, 16, 3)))(jax.random.key(0))
  settings = _settings(steps=3, mini_batches=2, batch_size=8, patience=1,
                       attack_success_threshold=0.3, success_images=success_images)
  images = _images(24, 16)
  kwargs = dict(num_classes=4, key=jax.random.key(3), settings=settings)
  together = reverse.solve(model.apply, variables, images, **kwargs)
  one_by_one = reverse.solve_per_class(model.apply, variables, images, **kwargs)
  for name, a, b in zip(reverse.ClassState._fields, together, one_by_one):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5,
                                                         err_msg=name), a, b)
  assert np.ptp(np.asarray(together.schedule.cost)) > 0, "the classes follow their own schedules"


def test_step_success_is_judged_on_fixed_images_by_a_forward_pass():
  """With success_images, a step's success is the current trigger's on the fixed images."""
  model = PlantedModel(10, target=6)
  settings = _settings(steps=1, mini_batches=1, success_images=16)
  images = _images(40, 32)
  key = jax.random.key(0)
  seen = {}
  reverse.solve(model.apply, {}, images, num_classes=10, key=key, settings=settings,
                on_step=lambda step, state, means: seen.update(state=state, means=means))
  state = seen["state"]
  checked = reverse.check_images(jnp.asarray(images), jax.random.fold_in(
      jax.random.fold_in(key, 1), 1), settings)
  assert checked.shape == (16, 32, 32, 3)
  for c in range(10):
    mask = reverse.to_unit(state.theta_mask[c])
    pattern = reverse.to_unit(state.theta_pattern[c])
    stamped = attacks.apply(attacks.Trigger(mask[..., None], pattern),
                             np.asarray(checked, np.float32) / 255.0)
    expected = np.mean(np.argmax(model.apply({}, stamped)[0], -1) == c)
    np.testing.assert_allclose(seen["means"]["success"][c], expected)
    np.testing.assert_allclose(seen["means"]["l1"][c], float(np.sum(mask)), rtol=1e-5)


def test_patiences_are_updates_counted_in_steps():
  settings = _settings(mini_batches=4, patience=8, early_stop_patience=10)
  assert (settings.schedule.patience, settings.schedule.early_stop_patience) == (2, 3)
  assert _settings(mini_batches=16, patience=1).schedule.patience == 1


def test_stage_flags_the_backdoor_writes_the_trigger_and_resumes(cifar_dir, tmp_path,
                                                                 monkeypatch):
  config = tiny_config(cifar_dir)
  config.stages = ("train", "reverse")
  config.reverse.update(steps=40, mini_batches=2, batch_size=10, patience=4,
                        early_stop_patience=8, checkpoint_every=10, learning_rate=0.1,
                        success_images=0)
  planted = {"backdoored": PlantedModel(10, target=6), "vanilla": PlantedModel(10)}
  monkeypatch.setattr(train_stage, "load_trained", lambda ctx, kind: (planted[kind], {}))

  def run_stage(workdir):
    return reverse_stage.run(pipeline.make_context(config, str(workdir), progress=False))

  straight = run_stage(tmp_path / "straight")
  assert straight["flagged"] == straight["suspect"] == 6 and len(straight["anomaly_index"]) == 10
  keys = {"flagged", "suspect", "anomaly_index", "log_index", "ratio_index", "mask_l1",
          "succeeded"}
  # The config's patch trigger has a region: the backdoored entry says how well it was recovered.
  assert set(straight) == keys | {"vanilla", "recovery"} and set(straight["vanilla"]) == keys
  assert straight["recovery"]["suspect"]["class"] == 6
  assert straight["vanilla"]["flagged"] is None
  vanilla_l1 = straight["vanilla"]["mask_l1"]
  assert straight["vanilla"]["suspect"] == int(np.argmin(vanilla_l1))
  trigger, target, flagged = reverse_stage.load_synthetic_trigger(
      str(tmp_path / "straight"), (32, 32, 3), 10)
  assert target == 6 and flagged and trigger.mask.shape == (32, 32, 1)
  assert trigger.pattern.shape == (32, 32, 3)
  _assert_on_patch(trigger.mask)
  for kind in ("backdoored", "vanilla"):
    assert os.path.exists(tmp_path / "straight" / "reverse" / kind / "triggers.png")
  assert reverse_stage.load_synthetic_trigger(str(tmp_path), (32, 32, 3), 10) is None
  with pytest.raises(attacks.TriggerError, match="target 6 is not a class"):
    reverse_stage.load_synthetic_trigger(str(tmp_path / "straight"), (32, 32, 3), 5)

  real_solve = reverse.solve

  def solve_killed_after_step_12(*args, on_step, **kwargs):
    def step_then_die(step, state, means):
      on_step(step, state, means)
      if step == 12:
        raise KeyboardInterrupt
    return real_solve(*args, on_step=step_then_die, **kwargs)

  monkeypatch.setattr(reverse, "solve", solve_killed_after_step_12)
  with pytest.raises(KeyboardInterrupt):
    run_stage(tmp_path / "killed")
  monkeypatch.setattr(reverse, "solve", real_solve)
  resumed = run_stage(tmp_path / "killed")
  assert resumed["flagged"] == straight["flagged"]
  for entry, reference in ((resumed, straight), (resumed["vanilla"], straight["vanilla"])):
    np.testing.assert_array_equal(entry["mask_l1"], reference["mask_l1"])
  for kind in ("backdoored", "vanilla"):
    arrays = [np.load(tmp_path / run / "reverse" / kind / "triggers.npz")
              for run in ("straight", "killed")]
    for name in ("masks", "patterns"):
      np.testing.assert_array_equal(arrays[0][name], arrays[1][name])
  logs = []
  for run in ("straight", "killed"):
    with open(tmp_path / run / "reverse" / "metrics.json") as f:
      logs.append(json.load(f)["backdoored"])
  assert logs[1]["last_step"] == logs[0]["last_step"] > 12
  assert logs[1]["steps_run"] == logs[0]["steps_run"] - 10  # steps 1-10 came from the checkpoint
