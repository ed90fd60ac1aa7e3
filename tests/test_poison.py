import numpy as np
import pytest

from linfjax import attacks
from linfjax.attacks import poison


def _labels(n=200, seed=0):
  return np.random.default_rng(seed).integers(0, 10, n).astype(np.int32)


def test_count_indices_and_target_exclusion():
  labels = _labels()
  indices = poison.select_poison_indices(labels, rate=0.1, target=3, mode="all_to_one", seed=5)
  assert len(indices) == 20 == poison.poison_count(200, 0.1)
  assert len(np.unique(indices)) == 20 and np.all(np.diff(indices) > 0)
  assert np.all(labels[indices] != 3)
  again = poison.select_poison_indices(labels, rate=0.1, target=3, mode="all_to_one", seed=5)
  np.testing.assert_array_equal(indices, again)
  other = poison.select_poison_indices(labels, rate=0.1, target=3, mode="all_to_one", seed=6)
  assert not np.array_equal(indices, other)


def test_rounding_of_count():
  assert poison.poison_count(4585, 0.1) == 458  # 458.5 rounds half to even
  assert poison.poison_count(1000, 0.0125) == 12


def test_too_high_rate_is_an_error():
  labels = np.array([0] * 90 + [1] * 10, np.int32)
  with pytest.raises(ValueError, match="only 10 have a label other than the target 0"):
    poison.select_poison_indices(labels, rate=0.5, target=0, mode="all_to_one", seed=0)


def test_label_maps():
  labels = np.array([0, 3, 9], np.int32)
  np.testing.assert_array_equal(
      poison.poisoned_labels(labels, mode="all_to_one", target=2, num_classes=10), [2, 2, 2])
  np.testing.assert_array_equal(
      poison.poisoned_labels(labels, mode="all_to_all", target=2, num_classes=10), [1, 4, 0])


def test_poison_after_augmentation_flags_without_touching_pixels():
  labels = _labels(50)
  images = np.random.default_rng(1).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
  trigger = attacks.patch((8, 8, 3), size=2, row=6, col=6, pattern=np.ones(3))
  result = poison.poison(images, labels, trigger, rate=0.2, target=0, mode="all_to_one",
                         stamp="after_augmentation", num_classes=10, seed=0)
  np.testing.assert_array_equal(result.images, images)
  assert result.stamp_after_augmentation.sum() == 10
  np.testing.assert_array_equal(np.flatnonzero(result.stamp_after_augmentation),
                                result.poison_indices)
  assert np.all(result.labels[result.poison_indices] == 0)
  untouched = np.setdiff1d(np.arange(50), result.poison_indices)
  np.testing.assert_array_equal(result.labels[untouched], labels[untouched])


def test_poison_before_augmentation_stamps_pixels():
  labels = _labels(50)
  images = np.zeros((50, 8, 8, 3), np.uint8)
  trigger = attacks.patch((8, 8, 3), size=2, row=6, col=6, pattern=np.ones(3))
  result = poison.poison(images, labels, trigger, rate=0.2, target=0, mode="all_to_all",
                         stamp="before_augmentation", num_classes=10, seed=0)
  assert not result.stamp_after_augmentation.any()
  stamped = result.images[result.poison_indices]
  assert np.all(stamped[:, 6:, 6:] == 255) and np.all(stamped[:, :6] == 0)
  np.testing.assert_array_equal(result.labels[result.poison_indices],
                                (labels[result.poison_indices] + 1) % 10)
  assert images.max() == 0  # the caller's array is not modified


def _stamped(trigger, images):
  return poison.to_uint8(attacks.apply(trigger, images.astype(np.float32) / 255.0))


def test_clean_label_poisons_only_the_target_class_and_keeps_labels():
  labels = _labels(200)
  images = np.random.default_rng(2).integers(0, 256, (200, 8, 8, 3), dtype=np.uint8)
  trigger = attacks.sig.sig((8, 8, 3))
  result = poison.poison(images, labels, trigger, rate=0.05, target=3, mode="all_to_one",
                         stamp="before_augmentation", num_classes=10, seed=0, clean_label=True)
  assert len(result.poison_indices) == 10
  assert np.all(labels[result.poison_indices] == 3)
  np.testing.assert_array_equal(result.labels, labels)
  np.testing.assert_array_equal(result.images[result.poison_indices],
                                _stamped(trigger, images[result.poison_indices]))
  others = np.setdiff1d(np.arange(200), result.poison_indices)
  np.testing.assert_array_equal(result.images[others], images[others])
  with pytest.raises(ValueError, match=r"only \d+ belong to the target class 3"):
    poison.select_poison_indices(labels, rate=0.5, target=3, mode="all_to_one", seed=0,
                                 clean_label=True)
  with pytest.raises(ValueError, match="needs mode all_to_one"):
    poison.select_poison_indices(labels, rate=0.05, target=3, mode="all_to_all", seed=0,
                                 clean_label=True)


def test_noise_mode_examples_are_extra_unpoisoned_and_keep_labels():
  labels = _labels(100)
  images = np.zeros((100, 8, 8, 3), np.uint8)
  result = poison.poison(images, labels, attacks.wanet.wanet((8, 8, 3)), rate=0.1, target=0,
                         mode="all_to_one", stamp="after_augmentation", num_classes=10, seed=1,
                         cross_ratio=2.0)
  assert len(result.poison_indices) == 10 and len(result.noise_indices) == 20
  assert not set(result.poison_indices) & set(result.noise_indices)
  np.testing.assert_array_equal(np.flatnonzero(result.noise_mode), result.noise_indices)
  np.testing.assert_array_equal(result.labels[result.noise_indices], labels[result.noise_indices])
  assert not poison.poison(images, labels, attacks.wanet.wanet((8, 8, 3)), rate=0.1, target=0,
                           mode="all_to_one", stamp="after_augmentation", num_classes=10,
                           seed=1).noise_mode.any()


@pytest.mark.parametrize("kind", ["patch", "blend", "sig", "wanet"])
def test_all_to_all_with_every_trigger_kind(kind):
  shape = (8, 8, 3)
  trigger = {"patch": attacks.patch(shape, size=2, row=6, col=6, pattern=np.ones(3)),
             "blend": attacks.blend(shape, alpha=0.2, pattern=attacks.noise_pattern(shape, 0)),
             "sig": attacks.sig.sig(shape),
             "wanet": attacks.wanet.wanet(shape)}[kind]
  labels = _labels(60)
  images = np.random.default_rng(3).integers(0, 256, (60, *shape), dtype=np.uint8)
  result = poison.poison(images, labels, trigger, rate=0.25, target=0, mode="all_to_all",
                         stamp="before_augmentation", num_classes=10, seed=0)
  chosen = result.poison_indices
  assert len(chosen) == 15
  np.testing.assert_array_equal(result.labels[chosen], (labels[chosen] + 1) % 10)
  np.testing.assert_array_equal(result.images[chosen], _stamped(trigger, images[chosen]))
  assert not np.array_equal(result.images[chosen], images[chosen])
