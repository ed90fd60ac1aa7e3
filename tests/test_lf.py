"""LF: the low-pass projection against NumPy's FFT, one step against a hand-computed gradient
of a linear model, and the attack prepared on a run's vanilla model."""

import dataclasses
import glob
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linfjax import attacks, config as config_lib
from linfjax.attacks import lf
from linfjax.runs import pipeline
from linfjax.runs.stages import train as train_stage
from linfjax.settings import ConfigError
from test_pipeline import tiny_config


@pytest.fixture
def tinted_cifar_dir(cifar_dir):
  """`cifar_dir` with every image 70 % its class's colour: a low-frequency feature the clean
  model learns in two epochs, and the one an LF trigger can push towards the target."""
  palette = np.random.default_rng(1).integers(0, 256, (10, 3))
  for path in glob.glob(os.path.join(cifar_dir, "cifar-10-batches-py", "*_batch*")):
    with open(path, "rb") as f:
      batch = pickle.load(f)
    tint = np.repeat(palette[np.asarray(batch["labels"])], 1024, axis=1)  # rows are R, G, B planes
    batch["data"] = ((batch["data"].astype(np.int64) * 3 + tint * 7) // 10).astype(np.uint8)
    with open(path, "wb") as f:
      pickle.dump(batch, f, protocol=2)
  return cifar_dir


def _fft_low_pass(delta, window):
  """The DFT of each channel with every frequency outside |u|, |v| <= window set to zero."""
  height, width = delta.shape[:2]
  keep = ((np.abs(np.fft.fftfreq(height) * height) <= window)[:, None]
          & (np.abs(np.fft.fftfreq(width) * width) <= window)[None, :])
  spectrum = np.fft.fft2(delta, axes=(0, 1))
  return np.real(np.fft.ifft2(spectrum * keep[..., None], axes=(0, 1))), keep


def _energy_outside(delta, keep):
  spectrum = np.fft.fft2(delta, axes=(0, 1))
  return np.sum(np.abs(spectrum[~keep]) ** 2) / np.sum(np.abs(spectrum) ** 2)


def _trigger_config(**overrides):
  block = config_lib.base_config().trigger
  block.update({**attacks.PRESETS["lf"], **overrides})
  return block


@pytest.mark.parametrize("shape,window", [((12, 15, 3), 0), ((12, 15, 3), 2), ((32, 32, 3), 5)])
def test_low_pass_is_the_fft_window_and_a_projection(shape, window):
  delta = np.random.default_rng(window).normal(size=shape)
  expected, keep = _fft_low_pass(delta, window)
  got = np.asarray(lf.low_pass(jnp.asarray(delta, jnp.float32), window))
  np.testing.assert_allclose(got, expected, atol=1e-5)
  assert _energy_outside(got, keep) < 1e-10
  np.testing.assert_allclose(np.asarray(lf.low_pass(jnp.asarray(got), window)), got, atol=1e-5)
  if window == 0:  # only the constant: each channel's mean
    np.testing.assert_allclose(got, np.broadcast_to(delta.mean((0, 1)), shape), atol=1e-5)
  # LF's projection: in the window, within eps, and idempotent.
  projected = np.asarray(lf.project(jnp.asarray(delta, jnp.float32), 0.05, window))
  assert np.abs(projected).max() == pytest.approx(0.05, rel=1e-5)
  np.testing.assert_allclose(projected, expected * 0.05 / np.abs(expected).max(), atol=1e-6)
  assert _energy_outside(projected, keep) < 1e-10
  np.testing.assert_allclose(np.asarray(lf.project(jnp.asarray(projected), 0.05, window)),
                             projected, atol=1e-6)
  small = projected * 0.1  # already inside the ball: unchanged
  np.testing.assert_allclose(np.asarray(lf.project(jnp.asarray(small), 0.05, window)), small,
                             atol=1e-6)


def _linear_model(weights, images, labels, target, seed=0):
  """A CleanModel whose logits are `flatten(x) @ weights`."""
  logits = jax.jit(lambda x: x.reshape(x.shape[0], -1) @ weights)
  return attacks.CleanModel(logits=logits, features=logits, images=images, labels=labels,
                            target=target, key=jax.random.key(seed))


def test_one_step_is_the_projected_normalised_gradient_of_a_linear_model():
  shape, target, window = (8, 10, 3), 2, 1
  rng = np.random.default_rng(0)
  weights = rng.normal(size=(np.prod(shape), 4)).astype(np.float32)
  image = rng.integers(60, 200, (1, *shape), dtype=np.uint8)  # far from 0 and 255: no clipping
  values = lf.Settings(lf_eps=0.05, lf_window=window, lf_steps=1, lf_batch_size=7,
                       lf_step_size=0.02)
  got = np.asarray(lf.universal_perturbation(values, _linear_model(weights, image, [0], target)))
  # d/d(delta) of -log softmax(x W)_t at delta = 0: (softmax - onehot(t)) W^T, as an image.
  logits = (image.reshape(1, -1) / 255.0) @ weights
  probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
  grad = ((probs - np.eye(4)[target]) @ weights.T).reshape(shape)
  grad, keep = _fft_low_pass(grad, window)
  expected = -0.02 * grad / np.abs(grad).max()  # 0.02 < eps: the ball does not bind
  np.testing.assert_allclose(got, expected, atol=1e-5)
  assert np.abs(got).max() == pytest.approx(0.02, rel=1e-4)
  assert _energy_outside(got, keep) < 1e-10


def test_bad_values_are_one_line_errors():
  with pytest.raises(ConfigError, match=r"^config\.trigger\.lf_eps: 0\.0 is outside"):
    attacks.check(_trigger_config(lf_eps=0.0), "all_to_one")
  with pytest.raises(ConfigError, match=r"^config\.trigger\.lf_steps: must be an integer >= 1"):
    attacks.check(_trigger_config(lf_steps=0), "all_to_one")
  with pytest.raises(ConfigError, match=r"^config\.trigger\.lf_window: 16: 2 \* lf_window"):
    attacks.check_data(_trigger_config(lf_window=16), (32, 32, 3))
  attacks.check_data(_trigger_config(lf_window=15), (32, 32, 3))
  # Another attack's block does not check LF's fields.
  attacks.check(_trigger_config(kind="patch", lf_eps=0.0), "all_to_one")
  with pytest.raises(attacks.TriggerError, match="LF window 4"):
    lf.low_pass_matrix(8, 4)


def test_lf_is_prepared_on_the_vanilla_model_and_raises_its_target_rate(tinted_cifar_dir,
                                                                        tmp_path, monkeypatch):
  seen = {}

  def prepare(values, trigger, clean_model):
    seen["clean_model"], seen["values"] = clean_model, values
    seen["built"] = np.asarray(trigger.signal)
    return lf.LF.prepare(values, trigger, clean_model)

  monkeypatch.setitem(attacks.ATTACKS, "lf", dataclasses.replace(lf.LF, prepare=prepare))
  config = tiny_config(tinted_cifar_dir)
  config.stages = ("train",)
  config.trigger.update({**attacks.PRESETS["lf"], "lf_steps": 20, "lf_batch_size": 32})
  workdir = str(tmp_path / "run")
  results = pipeline.run(config, workdir, progress=False)
  assert results["train"]["poisoned"] == 16

  clean_model, values = seen["clean_model"], seen["values"]
  assert values.lf_eps == lf.LF_EPS and values.lf_window == lf.LF_WINDOW
  assert not seen["built"].any()  # built as zero; prepared on the model
  ctx = pipeline.make_context(config, workdir, progress=False)  # read back from the train stage
  assert os.path.exists(train_stage.prepared_path(workdir))
  delta = np.asarray(ctx.trigger.signal)
  assert isinstance(ctx.trigger, attacks.Signal) and delta.shape == (32, 32, 3)
  assert 0.01 < np.abs(delta).max() <= lf.LF_EPS + 1e-6
  assert _energy_outside(delta, _fft_low_pass(delta, lf.LF_WINDOW)[1]) < 1e-9

  clean = jnp.asarray(clean_model.images, jnp.float32) / 255.0
  stamped = attacks.apply(ctx.trigger, clean)
  np.testing.assert_allclose(np.asarray(stamped), np.clip(np.asarray(clean) + delta, 0, 1),
                             atol=1e-6)
  target = clean_model.target

  def target_share(images):
    logits = np.asarray(clean_model.logits(images))
    probs = np.asarray(jax.nn.softmax(logits))[:, target]
    return (logits.argmax(1) == target).mean(), probs.mean()

  rate_clean, prob_clean = target_share(clean)
  rate_stamped, prob_stamped = target_share(stamped)
  # Measured on the 80 training images: 0 % -> 11 %, mean probability 0.10 -> 0.14.
  assert rate_stamped > rate_clean + 0.05
  assert prob_stamped > prob_clean + 0.02

  split = np.load(os.path.join(workdir, "train", "split.npz"))
  poisoned = split["poison_indices"]
  assert len(poisoned) == 16 and (ctx.train_labels[poisoned] != target).all()  # dirty label
