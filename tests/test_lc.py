"""LC: the PGD step against NumPy on a linear model, the eps bound in uint8 pixels, the corner
trigger against the reference's cells, and the attack made on a run's vanilla model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linfjax import attacks, config as config_lib
from linfjax.attacks import lc
from linfjax.runs import pipeline
from linfjax.runs.stages import train as train_stage
from linfjax.settings import ConfigError
from test_pipeline import tiny_config

SHAPE = (4, 5, 3)
CLASSES = 3


def _linear(seed=0):
  """Toy logits `x.flatten() @ W + b` as a jax function and its NumPy weights."""
  rng = np.random.default_rng(seed)
  weights = rng.normal(size=(int(np.prod(SHAPE)), CLASSES)).astype(np.float32)
  bias = rng.normal(size=CLASSES).astype(np.float32)
  logits = lambda x: x.reshape(x.shape[0], -1) @ jnp.asarray(weights) + jnp.asarray(bias)[None]
  return logits, weights, bias


def _numpy_cross_entropy(images, labels, weights, bias):
  logits = images.reshape(len(images), -1).astype(np.float64) @ weights + bias
  logits = logits - logits.max(1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  return -log_probs[np.arange(len(labels)), labels]


def _block(kind="lc", **overrides):
  """A `trigger` block: LC's preset (or the default patch) with `overrides`."""
  block = config_lib.base_config().trigger
  if kind == "lc":
    block.update(attacks.PRESETS["lc"])
  block.update(overrides)
  return block


def test_one_pgd_step_matches_numpy_on_a_linear_model():
  logits, weights, bias = _linear()
  rng = np.random.default_rng(1)
  originals = rng.uniform(0, 1, (6, *SHAPE)).astype(np.float32)
  originals[0, 0] = 0.0  # Pixels at the ends of [0, 1], where the step leaves the range.
  originals[1, 1] = 1.0
  eps, step = 0.03, 0.02
  adversarial = np.clip(originals + rng.uniform(-eps, eps, originals.shape), 0, 1)
  adversarial = adversarial.astype(np.float32)
  labels = np.array([0, 1, 2, 0, 1, 2])
  # d CE / d x = (softmax - onehot) @ W^T, per image.
  z = adversarial.reshape(6, -1).astype(np.float64) @ weights + bias
  probs = np.exp(z - z.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  gradient = ((probs - np.eye(CLASSES)[labels]) @ weights.T).reshape(adversarial.shape)
  assert np.abs(gradient).min() > 1e-4  # No sign near a tie.
  stepped = adversarial + step * np.sign(gradient)
  expected = np.clip(originals + np.clip(stepped - originals, -eps, eps), 0, 1)
  got = np.asarray(jax.jit(lambda *a: lc.pgd_step(logits, *a, eps=eps, step_size=step))(
      jnp.asarray(originals), jnp.asarray(adversarial), jnp.asarray(labels)))
  np.testing.assert_allclose(got, expected, atol=1e-6)
  # Both projections acted: some pixels on the eps ball's edge, some at 0 or 1.
  assert np.isclose(np.abs(got - originals), eps, atol=1e-6).mean() > 0.1
  assert (got == 0).sum() > 0 and (got == 1).sum() > 0
  assert np.all(np.abs(got - originals) <= eps + 1e-6)


def test_perturbed_pixels_stay_within_eps_and_raise_the_true_label_loss():
  logits, weights, bias = _linear(seed=2)
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (5, *SHAPE), dtype=np.uint8)
  labels = np.array([0, 1, 2, 2, 1])
  model = attacks.CleanModel(logits=logits, features=None, images=images, labels=labels,
                             target=0, key=jax.random.key(0))
  values = lc.Settings(lc_steps=10, lc_batch_size=2)  # Three batches, the last one padded.
  perturbed = lc.perturb(values, model, images, labels)
  assert perturbed.dtype == np.uint8 and perturbed.shape == images.shape
  change = perturbed.astype(int) - images.astype(int)
  # eps = 8/255: at most 8 grey levels either way, and most pixels moved all the way.
  assert np.abs(change).max() == 8 and (np.abs(change) == 8).mean() > 0.5
  before = _numpy_cross_entropy(images / 255.0, labels, weights, bias)
  after = _numpy_cross_entropy(perturbed / 255.0, labels, weights, bias)
  assert np.all(after > before) and np.mean(after - before) > 1.0, (before, after)
  # The batching is invisible: one batch of five gives the same pixels.
  whole = lc.perturb(dataclasses.replace(values, lc_batch_size=8), model, images, labels)
  np.testing.assert_array_equal(whole, perturbed)
  np.testing.assert_array_equal(lc.perturb(dataclasses.replace(values, lc_steps=0), model,
                                           images, labels), images)


def test_corner_trigger_is_the_references_patch():
  # The reference's cells in image order (1 white, 0 black), top-left and top-right corner;
  # the bottom corners repeat the top ones.
  left = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1]])
  right = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 1]])
  block = _block()
  attacks.check(block, "all_to_one")
  attacks.check_data(block, (32, 32, 3))
  assert attacks.has_region(block) and not attacks.needs_clean_model(_block("patch"))
  assert attacks.needs_clean_model(block)
  trigger = attacks.from_config(block, (32, 32, 3))
  images = np.random.default_rng(0).uniform(0.2, 0.8, (2, 32, 32, 3)).astype(np.float32)
  stamped = np.asarray(attacks.apply(trigger, jnp.asarray(images)))
  for rows in (slice(0, 3), slice(29, 32)):
    for cols, cells in ((slice(0, 3), left), (slice(29, 32), right)):
      np.testing.assert_array_equal(stamped[:, rows, cols], np.broadcast_to(
          cells[None, :, :, None], (2, 3, 3, 3)))
  region = np.asarray(attacks.region(trigger))
  assert region.sum() == 36
  np.testing.assert_array_equal(stamped[:, ~region], images[:, ~region])
  # The references add +-amplitude and clip; at amplitude 1 that is the same image.
  signs = lc.corner_signs((32, 32, 3))
  np.testing.assert_array_equal(stamped, np.clip(images + signs[None, :, :, None], 0, 1))
  one = attacks.from_config(_block(lc_corners="bottom_right"), (32, 32, 3))
  assert np.asarray(attacks.region(one)).sum() == 9 and np.asarray(attacks.region(one))[31, 31]
  half = attacks.from_config(_block(lc_amplitude=0.5), (32, 32, 3))
  assert np.asarray(half.mask).max() == 0.5
  # Other sizes: the 32x32 layout resized nearest-neighbour, 3x3 cells become 2x2 at 64x64.
  big = lc.corner_signs((64, 64, 3))
  np.testing.assert_array_equal(big[:6, :6], np.kron(2 * left - 1, np.ones((2, 2))))
  np.testing.assert_array_equal(big[-6:, -6:], np.kron(2 * right - 1, np.ones((2, 2))))


def test_bad_settings_are_one_line_errors():
  with pytest.raises(ConfigError,
                     match=r"^config\.trigger\.lc_eps: 0\.0 is outside \(0\.0, 1\.0\]$"):
    attacks.check(_block(lc_eps=0.0), "all_to_one")
  with pytest.raises(ConfigError, match=r"^config\.trigger\.lc_corners: unknown value 'top'; "
                                        r"known: all, bottom_right$"):
    attacks.check(_block(lc_corners="top"), "all_to_one")
  with pytest.raises(ConfigError, match=r"^config\.trigger\.lc_steps: must be an integer >= 0"):
    attacks.check(_block(lc_steps=-1), "all_to_one")
  with pytest.raises(ConfigError, match=r"^config\.trigger: LC's corner patches need images of "
                                        r"at least 11x11 \(got 8x8\)$"):
    attacks.check_data(_block(), (8, 8, 3))
  # Another attack's run ignores LC's fields.
  attacks.check(_block("patch", lc_eps=0.0), "all_to_one")


def test_lc_is_made_on_the_vanilla_model_in_the_train_stage(cifar_dir, tmp_path, monkeypatch):
  seen = {}
  real = attacks.ATTACKS["lc"]

  def perturb(values, clean_model, images, labels):
    seen.update(model=clean_model, images=images.copy(), labels=labels.copy())
    seen["perturbed"] = real.perturb_poisoned(values, clean_model, images, labels)
    return seen["perturbed"]

  monkeypatch.setitem(attacks.ATTACKS, "lc", dataclasses.replace(real, perturb_poisoned=perturb))
  config = tiny_config(cifar_dir)
  config.stages = ("train",)
  config.trigger.update({**attacks.PRESETS["lc"], "lc_steps": 5, "lc_step_size": 2 / 255,
                         "lc_batch_size": 4})
  config.poison.rate = 0.05
  workdir = str(tmp_path / "run")
  pipeline.run(config, workdir, progress=False)

  ctx = pipeline.make_context(config, workdir, progress=False)
  # The backdoored training set as the stage builds it from the prepared attack it saved (and
  # as a resumed run reads it back).
  poisoned = train_stage.backdoored_set(ctx, train_stage.prepare_attack(ctx, None, None))
  chosen = poisoned.poison_indices
  # Clean-label: four target-class images, labels kept, handed to the hook as they were.
  assert len(chosen) == 4 and np.all(ctx.train_labels[chosen] == 0)
  np.testing.assert_array_equal(poisoned.labels, ctx.train_labels)
  np.testing.assert_array_equal(seen["images"], ctx.train_images[chosen])
  np.testing.assert_array_equal(seen["labels"], ctx.train_labels[chosen])
  # The poisoned examples are the hook's perturbed images, at most eps away.
  np.testing.assert_array_equal(poisoned.images[chosen], seen["perturbed"])
  change = poisoned.images[chosen].astype(int) - ctx.train_images[chosen].astype(int)
  assert np.abs(change).max() <= 8 and np.abs(change).mean() > 4
  others = np.setdiff1d(np.arange(len(poisoned.labels)), chosen)
  np.testing.assert_array_equal(poisoned.images[others], ctx.train_images[others])

  def loss(images):
    log_probs = jax.nn.log_softmax(seen["model"].logits(jnp.asarray(images / 255.0, jnp.float32)))
    return -np.asarray(log_probs)[np.arange(len(chosen)), ctx.train_labels[chosen]]

  assert np.all(loss(poisoned.images[chosen]) > loss(ctx.train_images[chosen]))
