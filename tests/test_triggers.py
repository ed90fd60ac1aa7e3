import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linfjax import config as config_lib
from linfjax import attacks
from linfjax.attacks import warp


def _trigger_config(**overrides):
  config = config_lib.base_config().trigger
  config.update(overrides)
  return config


def test_bottom_right_white_patch_matches_numpy():
  images = np.random.default_rng(0).random((4, 32, 32, 3)).astype(np.float32)
  trigger = attacks.from_config(_trigger_config(), (32, 32, 3))
  stamped = np.asarray(jax.jit(attacks.apply)(trigger, jnp.asarray(images)))
  expected = images.copy()
  expected[:, 29:32, 29:32, :] = 1.0
  np.testing.assert_array_equal(stamped, expected)
  assert np.asarray(attacks.region(trigger)).sum() == 9


def test_checkerboard_at_offset_matches_numpy():
  images = np.zeros((2, 10, 12, 3), np.float32)
  config = _trigger_config(position="offset", offset=(2, 5), size=4, pattern="checkerboard",
                           color=(1.0, 0.5, 0.0))
  stamped = np.asarray(attacks.apply(attacks.from_config(config, (10, 12, 3)), images))
  expected = np.zeros((10, 12, 3), np.float32)
  for r in range(4):
    for c in range(4):
      if (r + c) % 2 == 0:
        expected[2 + r, 5 + c] = (1.0, 0.5, 0.0)
  np.testing.assert_array_equal(stamped[0], expected)


@pytest.mark.parametrize("position,corner", [("top_left", (0, 0)), ("top_right", (0, 29)),
                                             ("bottom_left", (29, 0))])
def test_corners(position, corner):
  trigger = attacks.from_config(_trigger_config(position=position), (32, 32, 3))
  rows, cols = np.nonzero(np.asarray(attacks.region(trigger)))
  assert (rows.min(), cols.min()) == corner and rows.max() - rows.min() == 2


def test_given_array_pattern(tmp_path):
  pattern = np.random.default_rng(1).random((3, 3, 3)).astype(np.float32)
  path = str(tmp_path / "p.npy")
  np.save(path, pattern)
  trigger = attacks.from_config(_trigger_config(pattern="file", pattern_file=path), (32, 32, 3))
  stamped = np.asarray(attacks.apply(trigger, jnp.zeros((1, 32, 32, 3))))
  np.testing.assert_array_equal(stamped[0, 29:, 29:], pattern)


def test_blend_matches_formula():
  images = np.random.default_rng(2).random((3, 8, 8, 3)).astype(np.float32)
  config = _trigger_config(kind="blend", pattern="noise", alpha=0.3, noise_seed=7)
  trigger = attacks.from_config(config, (8, 8, 3))
  pattern = attacks.noise_pattern((8, 8, 3), 7)
  expected = 0.7 * images + 0.3 * pattern
  np.testing.assert_allclose(np.asarray(attacks.apply(trigger, images)), expected, atol=1e-6)
  # Same seed, same noise; another seed, other noise.
  np.testing.assert_array_equal(pattern, attacks.noise_pattern((8, 8, 3), 7))
  assert not np.allclose(pattern, attacks.noise_pattern((8, 8, 3), 8))


def test_triggers_vmap_over_their_parameters():
  images = jnp.asarray(np.random.default_rng(3).random((2, 8, 8, 3)), jnp.float32)
  stack = [attacks.patch((8, 8, 3), size=2, row=r, col=r, pattern=np.ones(3)) for r in range(3)]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *stack)
  batched = jax.jit(jax.vmap(attacks.apply, in_axes=(0, None)))(stacked, images)
  assert batched.shape == (3, 2, 8, 8, 3)
  for i, trigger in enumerate(stack):
    np.testing.assert_array_equal(batched[i], attacks.apply(trigger, images))


def test_patch_that_does_not_fit_is_an_error():
  with pytest.raises(attacks.TriggerError, match="does not fit a 32x32 image"):
    attacks.from_config(_trigger_config(position="offset", offset=(30, 0), size=3), (32, 32, 3))
  with pytest.raises(attacks.TriggerError, match="does not fit"):
    attacks.from_config(_trigger_config(size=40), (32, 32, 3))


def test_bad_pattern_values_and_files(tmp_path):
  path = str(tmp_path / "bad.npy")
  np.save(path, np.full((3, 3, 3), 2.0))
  with pytest.raises(attacks.TriggerError, match=r"values in \[0, 1\]"):
    attacks.from_config(_trigger_config(pattern="file", pattern_file=path), (32, 32, 3))
  with pytest.raises(attacks.TriggerError, match="not found"):
    attacks.from_config(_trigger_config(pattern="file", pattern_file=str(tmp_path / "x.npy")),
                         (32, 32, 3))


def test_sig_signal_and_stamp_match_numpy():
  shape = (4, 16, 3)
  trigger = attacks.from_config(_trigger_config(**config_lib.TRIGGER_PRESETS["sig"]), shape)
  columns = np.arange(16)
  row = 40 / 255 * np.sin(2 * np.pi * columns * 6 / 16)
  np.testing.assert_allclose(np.asarray(trigger.signal),
                             np.broadcast_to(row[None, :, None], shape), atol=1e-7)
  images = np.random.default_rng(4).random((3, *shape)).astype(np.float32)
  stamped = np.asarray(jax.jit(attacks.apply)(trigger, jnp.asarray(images)))
  np.testing.assert_allclose(stamped, np.clip(images + row[None, None, :, None], 0, 1),
                             atol=1e-6)
  assert np.asarray(attacks.region(trigger)).all()
  smaller = attacks.sig.sig(shape, amplitude=0.1, frequency=2.0)
  np.testing.assert_allclose(np.asarray(smaller.signal)[0, :, 0],
                             0.1 * np.sin(2 * np.pi * columns * 2 / 16), atol=1e-7)


def test_wanet_trigger_resamples_at_its_grid_and_vmaps():
  shape = (8, 8, 3)
  config = _trigger_config(**config_lib.TRIGGER_PRESETS["wanet"])
  trigger = attacks.from_config(config, shape)
  np.testing.assert_array_equal(trigger.grid, warp.wanet_grid(shape, grid_size=4, strength=0.5,
                                                              seed=0))
  images = jnp.asarray(np.random.default_rng(5).random((2, *shape)), jnp.float32)
  stamped = jax.jit(attacks.apply)(trigger, images)
  np.testing.assert_allclose(stamped, warp.grid_sample(images, trigger.grid), atol=1e-6)
  assert not np.allclose(stamped, images) and np.asarray(attacks.region(trigger)).all()
  stack = [attacks.wanet.wanet(shape, seed=seed) for seed in range(3)]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *stack)
  batched = jax.jit(jax.vmap(attacks.apply, in_axes=(0, None)))(stacked, images)
  for i, one in enumerate(stack):
    np.testing.assert_allclose(batched[i], attacks.apply(one, images), atol=1e-6)


def test_noise_mode_jitters_the_warp_per_image_and_leaves_other_kinds_alone():
  shape = (8, 8, 3)
  trigger = attacks.wanet.wanet(shape, seed=1)
  images = jnp.asarray(np.random.default_rng(6).random((3, *shape)), jnp.float32)
  key = jax.random.key(9)
  out = np.asarray(jax.jit(attacks.apply_noise_mode)(trigger, images, key))
  noise = jax.random.uniform(key, (3, 8, 8, 2), minval=-1.0, maxval=1.0)
  grids = np.clip(np.asarray(trigger.grid)[None] + np.asarray(noise) / 8, -1, 1)
  np.testing.assert_allclose(out, warp.grid_sample(images, grids), atol=1e-6)
  assert not np.allclose(out, attacks.apply(trigger, images), atol=1e-3)
  patch = attacks.patch(shape, size=2, row=0, col=0, pattern=np.ones(3))
  np.testing.assert_array_equal(attacks.apply_noise_mode(patch, images, key), images)


def test_bad_sig_and_wanet_parameters_are_errors():
  with pytest.raises(attacks.TriggerError, match="amplitude 1.5"):
    attacks.sig.sig((8, 8, 3), amplitude=1.5)
  with pytest.raises(attacks.TriggerError, match=r"grid size 9 must be in \[2, 8\]"):
    attacks.wanet.wanet((8, 8, 3), grid_size=9)
