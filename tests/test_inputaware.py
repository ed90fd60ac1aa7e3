"""Input-aware attack: the generators and blend against NumPy, the cross mode with a hand-built
generator, stacks of triggers, the settings' errors, and the attack prepared in a train stage."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linfjax import attacks, config as config_lib
from linfjax.attacks import inputaware
from linfjax.runs import pipeline
from linfjax.runs.stages import train as train_stage
from linfjax.settings import ConfigError
from test_pipeline import tiny_config

EPS = 1e-7


def _conv(x, layer, relu):
  """3x3 convolution with zero padding 1 (PyTorch's Conv2d(k=3, padding=1)), NHWC, then batch
  norm in evaluation mode (running statistics, eps 1e-5) and ReLU."""
  layer = {key: np.asarray(value, np.float64) for key, value in layer.items()}
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  height, width = x.shape[1:3]
  out = sum(padded[:, i:i + height, j:j + width] @ layer["w"][i, j]
            for i in range(3) for j in range(3)) + layer["b"]
  out = (out - layer["mean"]) / np.sqrt(layer["var"] + 1e-5) * layer["scale"] + layer["offset"]
  return np.maximum(out, 0) if relu else out


def _upsample(x, height, width):
  """Bilinear resize with half-pixel centres, sources clamped at the border (PyTorch's
  Upsample(mode='bilinear', align_corners=False))."""
  def axis(size_in, size_out):
    source = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
    low = np.floor(source).astype(int)
    return low, np.minimum(low + 1, size_in - 1), source - low
  r0, r1, fr = axis(x.shape[1], height)
  c0, c1, fc = axis(x.shape[2], width)
  rows = x[:, r0] * (1 - fr)[None, :, None, None] + x[:, r1] * fr[None, :, None, None]
  return rows[:, :, c0] * (1 - fc)[None, None, :, None] + rows[:, :, c1] * fc[None, None, :, None]


def _generate(params, images):
  """The reference's Generator (batch norm in evaluation mode), written plainly on NumPy."""
  layers = [params[name] for name in sorted(params)]
  depth = (len(layers) - 1) // 4
  x, sizes = 2.0 * np.asarray(images, np.float64) - 1.0, []
  for level in range(depth):
    x = _conv(_conv(x, layers[2 * level], True), layers[2 * level + 1], True)
    sizes.append(x.shape[1:3])
    h, w = x.shape[1] // 2, x.shape[2] // 2
    x = x[:, :2 * h, :2 * w].reshape(x.shape[0], h, 2, w, 2, -1).max(axis=(2, 4))
  x = _conv(x, layers[2 * depth], True)
  for level in range(depth):
    x = _upsample(x, *sizes[depth - 1 - level])
    x = _conv(x, layers[2 * depth + 1 + 2 * level], True)
    x = _conv(x, layers[2 * depth + 2 + 2 * level], level < depth - 1)
  return np.tanh(x) / (2 + EPS) + 0.5


def _stamp(images, patterns, raw_masks):
  masks = np.tanh(np.asarray(raw_masks, np.float64) * 20 - 10) / (2 + EPS) + 0.5
  return images + masks * (patterns - images)


def test_stamp_is_the_generated_blend():
  shape = (7, 10, 3)  # Odd sides: the decoder returns to the encoder's sizes.
  trigger = inputaware.inputaware(shape, channels=3, depth=2, seed=3)
  assert [p["w"].shape[2:] for _, p in sorted(trigger.pattern.items())] == [
      (3, 3), (3, 3), (3, 6), (6, 6), (6, 6), (6, 6), (6, 3), (3, 3), (3, 3)]
  assert trigger.mask["conv_08"]["w"].shape == (3, 3, 3, 1)
  rng = np.random.default_rng(0)
  images = rng.random((4, *shape), dtype=np.float32)
  # Batch norms in evaluation mode with running statistics and affine parameters of their own.
  for layer in [*trigger.pattern.values(), *trigger.mask.values()]:
    size = layer["b"].shape
    layer.update(b=jnp.asarray(rng.normal(0, 0.1, size), jnp.float32),
                 scale=jnp.asarray(rng.uniform(0.5, 1.5, size), jnp.float32),
                 offset=jnp.asarray(rng.normal(0, 0.3, size), jnp.float32),
                 mean=jnp.asarray(rng.normal(0, 0.3, size), jnp.float32),
                 var=jnp.asarray(rng.uniform(0.5, 2.0, size), jnp.float32))
  patterns, raw_masks = _generate(trigger.pattern, images), _generate(trigger.mask, images)
  np.testing.assert_allclose(np.asarray(inputaware.generate(trigger.pattern, jnp.asarray(images))),
                             patterns, atol=2e-5)
  stamped = np.asarray(jax.jit(attacks.apply)(trigger, jnp.asarray(images)))
  np.testing.assert_allclose(stamped, _stamp(images, patterns, raw_masks), atol=5e-5)
  assert np.abs(stamped - images).mean() > 0.01
  assert np.asarray(attacks.region(trigger)).shape == (7, 10)
  # Training mode: each layer normalised by its batch's statistics (variance unbiased), which
  # the running ones follow with momentum 0.05.
  stats = {}
  inputaware.generate(trigger.pattern, jnp.asarray(images), stats)
  first = dict(trigger.pattern["conv_00"], mean=0.0, var=1.0 - 1e-5, scale=1.0, offset=0.0)
  pre_norm = _conv(2.0 * images - 1.0, first, relu=False)
  np.testing.assert_allclose(stats["conv_00"]["mean"], pre_norm.mean((0, 1, 2)), atol=1e-5)
  np.testing.assert_allclose(stats["conv_00"]["var"], pre_norm.reshape(-1, 3).var(0, ddof=1),
                             rtol=1e-4)
  running = inputaware._update_running(trigger.pattern, stats)["conv_00"]
  np.testing.assert_allclose(running["mean"], 0.95 * np.asarray(trigger.pattern["conv_00"]["mean"])
                             + 0.05 * np.asarray(stats["conv_00"]["mean"]), rtol=1e-6)
  # A hand-built generator with constant outputs: zero kernels and scales, the last layer's
  # batch-norm offset only.
  const = trigger._replace(
      pattern=jax.tree.map(jnp.zeros_like, trigger.pattern),
      mask=jax.tree.map(jnp.zeros_like, trigger.mask))
  const.pattern["conv_08"]["offset"] = jnp.asarray([-1.0, 0.0, 2.0])
  const.mask["conv_08"]["offset"] = jnp.asarray([0.1])
  pattern = np.tanh([-1.0, 0.0, 2.0]) / (2 + EPS) + 0.5
  expected = _stamp(images, pattern, np.tanh(0.1) / (2 + EPS) + 0.5)
  np.testing.assert_allclose(np.asarray(attacks.apply(const, jnp.asarray(images))), expected,
                             atol=1e-6)


def _identity_generator(trigger):
  """A pattern net passing image channel 0 (grey level v) through as 2v, then
  `tanh(2v * (1, -1, 0.5) + (-1, 0.5, 0))` in its 3 outputs (batch norms the identity); a
  mask net of almost 1."""
  pattern = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), trigger.pattern)
  for layer in pattern.values():
    layer["w"][1, 1, 0, 0] = 1.0
    layer["scale"][:], layer["var"][:] = 1.0, 1.0 - 1e-5
  pattern["conv_00"]["b"][0] = 1.0
  pattern["conv_04"]["w"][1, 1, 0] = [1.0, -1.0, 0.5]
  pattern["conv_04"]["b"][:] = [-1.0, 0.5, 0.0]
  mask = jax.tree.map(jnp.zeros_like, trigger.mask)
  mask["conv_04"]["offset"] = jnp.asarray([30.0])
  return trigger._replace(pattern=jax.tree.map(jnp.asarray, pattern), mask=mask)


def test_cross_mode_takes_another_images_pattern():
  trigger = _identity_generator(inputaware.inputaware((6, 6, 3), channels=2, depth=1))
  grey = np.linspace(0.1, 0.9, 8, dtype=np.float32)
  images = np.broadcast_to(grey[:, None, None, None], (8, 6, 6, 3)).copy()
  own = np.tanh(2 * grey[:, None] * [1.0, -1.0, 0.5] + [-1.0, 0.5, 0.0]) / (2 + EPS) + 0.5
  stamped = np.asarray(attacks.apply(trigger, jnp.asarray(images)))
  np.testing.assert_allclose(stamped, np.broadcast_to(own[:, None, None], stamped.shape),
                             atol=1e-5)
  for seed in range(3):
    crossed = np.asarray(attacks.apply_noise_mode(trigger, jnp.asarray(images),
                                                  jax.random.key(seed)))[:, 0, 0]
    partners = [int(np.argmin(np.abs(own - value).sum(1))) for value in crossed]
    np.testing.assert_allclose(crossed, own[partners], atol=1e-5)
    # Every image is stamped with the pattern of another, each pattern used once.
    assert all(partner != i for i, partner in enumerate(partners))
    assert sorted(partners) == list(range(8))


def test_a_stack_of_two_triggers_vmaps():
  shape = (8, 8, 3)
  first = inputaware.inputaware(shape, channels=2, depth=1, seed=0)
  second = inputaware.inputaware(shape, channels=2, depth=1, seed=1)
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), first, second)
  images = jnp.asarray(np.random.default_rng(2).random((3, *shape), dtype=np.float32))
  both = np.asarray(jax.jit(jax.vmap(attacks.apply, in_axes=(0, None)))(stacked, images))
  for index, alone in enumerate((first, second)):
    np.testing.assert_allclose(both[index], np.asarray(attacks.apply(alone, images)), atol=1e-5)
  assert np.abs(both[0] - both[1]).max() > 0.01
  noisy = jax.vmap(attacks.apply_noise_mode, in_axes=(0, None, None))(stacked, images,
                                                                      jax.random.key(0))
  assert noisy.shape == (2, 3, *shape)


def _trigger_block(**overrides):
  block = config_lib.base_config().trigger
  block.update({**attacks.PRESETS["inputaware"], **overrides})
  return block


def test_settings_and_their_one_line_errors():
  block = _trigger_block()
  attacks.check(block, "all_to_one")
  assert block.cross_ratio == 1.0 and block.inputaware_mask_density == 0.032
  assert not attacks.has_region(block) and attacks.needs_clean_model(block)
  with pytest.raises(ConfigError, match=r"^config\.trigger\.inputaware_depth: must be an integer "
                                        r">= 1, got 0$"):
    attacks.check(_trigger_block(inputaware_depth=0), None)
  with pytest.raises(ConfigError, match=r"^config\.trigger\.inputaware_mask_density: 1\.5 is "
                                        r"outside \[0\.0, 1\.0\]$"):
    attacks.check(_trigger_block(inputaware_mask_density=1.5), None)
  with pytest.raises(ConfigError, match=r"^config\.trigger\.inputaware_depth: 6 levels halve "
                                        r"the 32x32 image below one pixel$"):
    attacks.check_data(_trigger_block(inputaware_depth=6), (32, 32, 3))
  bpp = config_lib.base_config().trigger
  bpp.update({**attacks.PRESETS["bpp"], "cross_ratio": 1.0})
  with pytest.raises(ConfigError, match=r"config\.trigger\.cross_ratio: 1\.0: the 'bpp' trigger "
                                        r"has no noise mode \(only wanet, inputaware have one\)"):
    attacks.check(bpp, None)


def test_train_stage_prepares_the_generators_on_the_vanilla_model(cifar_dir, tmp_path,
                                                                   monkeypatch):
  seen = {}
  entry = attacks.ATTACKS["inputaware"]

  def prepare(values, trigger, clean_model):
    seen.update(built=trigger, clean_model=clean_model)
    seen["prepared"] = entry.prepare(values, trigger, clean_model)
    return seen["prepared"]

  monkeypatch.setitem(attacks.ATTACKS, "inputaware", dataclasses.replace(entry, prepare=prepare))
  config = tiny_config(cifar_dir)
  config.stages = ("train",)
  config.trigger.update(attacks.PRESETS["inputaware"])
  config.trigger.update(inputaware_channels=4, inputaware_depth=1, inputaware_mask_epochs=1,
                        inputaware_epochs=3, inputaware_batch_size=16, inputaware_lr=0.05)
  workdir = str(tmp_path / "run")
  pipeline.run(config, workdir, progress=False)

  built, prepared, clean_model = seen["built"], seen["prepared"], seen["clean_model"]
  for part in ("pattern", "mask"):
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
             for a, b in zip(jax.tree.leaves(getattr(built, part)),
                             jax.tree.leaves(getattr(prepared, part)))]
    assert max(moved) > 1e-3, part
  images = jnp.asarray(clean_model.images, jnp.float32) / 255.0

  def target_share(trigger):
    probabilities = jax.nn.softmax(clean_model.logits(attacks.apply(trigger, images)))
    return (float(probabilities[:, clean_model.target].mean()),
            float(jnp.mean(jnp.argmax(probabilities, -1) == clean_model.target)))

  (built_probability, built_rate), (probability, rate) = target_share(built), target_share(prepared)
  assert probability > built_probability + 0.02 and rate >= built_rate, (
      built_probability, probability, built_rate, rate)
  # The cross mode trains one example per poisoned one; later stages read the trigger back.
  with np.load(os.path.join(workdir, "train", "split.npz")) as split:
    assert len(split["noise_indices"]) == len(split["poison_indices"]) == 16
  assert os.path.exists(train_stage.prepared_path(workdir))
  ctx = pipeline.make_context(config, workdir, progress=False)
  for saved, made in zip(jax.tree.leaves(ctx.trigger), jax.tree.leaves(prepared)):
    np.testing.assert_array_equal(np.asarray(saved), np.asarray(made))
