"""An attack made on the clean model: the vanilla model trains first, the attack's `prepare`
and `perturb_poisoned` hooks see it, and the prepared trigger is saved and read back."""

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest

from linfjax import attacks
from linfjax.runs import checkpoints, pipeline
from linfjax.runs.stages import train as train_stage
from test_pipeline import tiny_config


def test_prepared_attack_is_made_on_the_vanilla_model_and_read_back(cifar_dir, tmp_path,
                                                                     monkeypatch):
  seen = {}

  def prepare(values, trigger, clean_model):
    assert isinstance(clean_model, attacks.CleanModel)
    seen["vanilla_logits"] = np.asarray(clean_model.logits(jnp.zeros((1, 32, 32, 3))))
    seen["features"] = clean_model.features(jnp.zeros((2, 32, 32, 3))).shape
    return trigger._replace(pattern=jnp.full_like(trigger.pattern, 0.5))

  def perturb(values, clean_model, images, labels):
    seen["perturbed"] = len(images)
    return np.full_like(images, 7)

  made_on_clean = dataclasses.replace(attacks.ATTACKS["patch"], prepare=prepare,
                                      perturb_poisoned=perturb)
  monkeypatch.setitem(attacks.ATTACKS, "patch", made_on_clean)
  trained = []
  real_train = train_stage._train_model
  monkeypatch.setattr(train_stage, "_train_model", lambda ctx, kind, *a, **k: (
      trained.append(kind), real_train(ctx, kind, *a, **k))[1])
  poisoned_sets = []
  real_set = train_stage.backdoored_set
  monkeypatch.setattr(train_stage, "backdoored_set", lambda ctx, images: (
      poisoned_sets.append(real_set(ctx, images)), poisoned_sets[-1])[1])

  config = tiny_config(cifar_dir)
  config.stages = ("train",)
  workdir = str(tmp_path / "run")
  pipeline.run(config, workdir, progress=False)

  assert trained == ["vanilla", "backdoored"]
  assert seen["vanilla_logits"].shape == (1, 10) and seen["features"][0] == 2
  poisoned = poisoned_sets[0]
  assert seen["perturbed"] == len(poisoned.poison_indices) == 16
  # The poisoned examples carry the perturbed pixels (stamped after augmentation, so unstamped
  # here); the others are the run's own images.
  assert np.all(poisoned.images[poisoned.poison_indices] == 7)
  others = np.setdiff1d(np.arange(len(poisoned.labels)), poisoned.poison_indices)
  ctx = pipeline.make_context(config, workdir, progress=False)
  np.testing.assert_array_equal(poisoned.images[others], ctx.train_images[others])
  # Later stages (and the API) read the prepared trigger back, not the one the config builds.
  assert os.path.exists(train_stage.prepared_path(workdir))
  np.testing.assert_allclose(np.asarray(ctx.trigger.pattern), 0.5)
  built = attacks.from_config(config.trigger, ctx.dataset.image_shape)
  assert not np.allclose(np.asarray(built.pattern), 0.5)


def test_a_finished_run_without_its_prepared_attack_is_refused(cifar_dir, tmp_path, monkeypatch):
  made_on_clean = dataclasses.replace(attacks.ATTACKS["patch"],
                                      prepare=lambda values, trigger, clean_model: trigger)
  monkeypatch.setitem(attacks.ATTACKS, "patch", made_on_clean)
  config = tiny_config(cifar_dir)
  config.stages = ("train", "reverse")
  workdir = str(tmp_path / "run")

  def stop_after_training(ctx):
    raise KeyboardInterrupt

  with monkeypatch.context() as patched:
    patched.setitem(pipeline.STAGES, "reverse", stop_after_training)
    with pytest.raises(KeyboardInterrupt):
      pipeline.run(config, workdir, progress=False)
  os.remove(train_stage.prepared_path(workdir))
  with pytest.raises(checkpoints.CheckpointError, match="prepared_attack.npz: missing"):
    pipeline.run(config, workdir, progress=False)
  assert not os.path.exists(os.path.join(workdir, "reverse"))


def test_api_train_refuses_an_attack_made_on_a_clean_model(cifar_dir, monkeypatch):
  import linfjax
  made_on_clean = dataclasses.replace(attacks.ATTACKS["patch"],
                                      prepare=lambda values, trigger, clean_model: trigger)
  monkeypatch.setitem(attacks.ATTACKS, "patch", made_on_clean)
  config = tiny_config(cifar_dir)
  dataset = linfjax.load_dataset(config)
  split = linfjax.clean_set(dataset, size=20, seed=0)
  trigger = linfjax.make_attack(config.trigger, dataset.image_shape)
  with pytest.raises(attacks.TriggerError, match="made on a clean model.*run\\(config, workdir"):
    linfjax.train(config, dataset, split, trigger)
