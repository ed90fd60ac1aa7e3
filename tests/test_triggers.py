import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linfjax import config as config_lib
from linfjax import triggers


def _trigger_config(**overrides):
  config = config_lib.base_config().trigger
  config.update(overrides)
  return config


def test_bottom_right_white_patch_matches_numpy():
  images = np.random.default_rng(0).random((4, 32, 32, 3)).astype(np.float32)
  trigger = triggers.from_config(_trigger_config(), (32, 32, 3))
  stamped = np.asarray(jax.jit(triggers.apply)(trigger, jnp.asarray(images)))
  expected = images.copy()
  expected[:, 29:32, 29:32, :] = 1.0
  np.testing.assert_array_equal(stamped, expected)
  assert np.asarray(triggers.region(trigger)).sum() == 9


def test_checkerboard_at_offset_matches_numpy():
  images = np.zeros((2, 10, 12, 3), np.float32)
  config = _trigger_config(position="offset", offset=(2, 5), size=4, pattern="checkerboard",
                           color=(1.0, 0.5, 0.0))
  stamped = np.asarray(triggers.apply(triggers.from_config(config, (10, 12, 3)), images))
  expected = np.zeros((10, 12, 3), np.float32)
  for r in range(4):
    for c in range(4):
      if (r + c) % 2 == 0:
        expected[2 + r, 5 + c] = (1.0, 0.5, 0.0)
  np.testing.assert_array_equal(stamped[0], expected)


@pytest.mark.parametrize("position,corner", [("top_left", (0, 0)), ("top_right", (0, 29)),
                                             ("bottom_left", (29, 0))])
def test_corners(position, corner):
  trigger = triggers.from_config(_trigger_config(position=position), (32, 32, 3))
  rows, cols = np.nonzero(np.asarray(triggers.region(trigger)))
  assert (rows.min(), cols.min()) == corner and rows.max() - rows.min() == 2


def test_given_array_pattern(tmp_path):
  pattern = np.random.default_rng(1).random((3, 3, 3)).astype(np.float32)
  path = str(tmp_path / "p.npy")
  np.save(path, pattern)
  trigger = triggers.from_config(_trigger_config(pattern="file", pattern_file=path), (32, 32, 3))
  stamped = np.asarray(triggers.apply(trigger, jnp.zeros((1, 32, 32, 3))))
  np.testing.assert_array_equal(stamped[0, 29:, 29:], pattern)


def test_blend_matches_formula():
  images = np.random.default_rng(2).random((3, 8, 8, 3)).astype(np.float32)
  config = _trigger_config(kind="blend", pattern="noise", alpha=0.3, noise_seed=7)
  trigger = triggers.from_config(config, (8, 8, 3))
  pattern = triggers.noise_pattern((8, 8, 3), 7)
  expected = 0.7 * images + 0.3 * pattern
  np.testing.assert_allclose(np.asarray(triggers.apply(trigger, images)), expected, atol=1e-6)
  # Same seed, same noise; another seed, other noise.
  np.testing.assert_array_equal(pattern, triggers.noise_pattern((8, 8, 3), 7))
  assert not np.allclose(pattern, triggers.noise_pattern((8, 8, 3), 8))


def test_triggers_vmap_over_their_parameters():
  images = jnp.asarray(np.random.default_rng(3).random((2, 8, 8, 3)), jnp.float32)
  stack = [triggers.patch((8, 8, 3), size=2, row=r, col=r, pattern=np.ones(3)) for r in range(3)]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *stack)
  batched = jax.jit(jax.vmap(triggers.apply, in_axes=(0, None)))(stacked, images)
  assert batched.shape == (3, 2, 8, 8, 3)
  for i, trigger in enumerate(stack):
    np.testing.assert_array_equal(batched[i], triggers.apply(trigger, images))


def test_patch_that_does_not_fit_is_an_error():
  with pytest.raises(triggers.TriggerError, match="does not fit a 32x32 image"):
    triggers.from_config(_trigger_config(position="offset", offset=(30, 0), size=3), (32, 32, 3))
  with pytest.raises(triggers.TriggerError, match="does not fit"):
    triggers.from_config(_trigger_config(size=40), (32, 32, 3))


def test_bad_pattern_values_and_files(tmp_path):
  path = str(tmp_path / "bad.npy")
  np.save(path, np.full((3, 3, 3), 2.0))
  with pytest.raises(triggers.TriggerError, match=r"values in \[0, 1\]"):
    triggers.from_config(_trigger_config(pattern="file", pattern_file=path), (32, 32, 3))
  with pytest.raises(triggers.TriggerError, match="not found"):
    triggers.from_config(_trigger_config(pattern="file", pattern_file=str(tmp_path / "x.npy")),
                         (32, 32, 3))
