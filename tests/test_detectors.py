"""Data-side detectors: spectral signatures, activation clustering, STRIP, and their scores."""

import importlib

import jax
import numpy as np
import pytest

from linfjax import models
from linfjax.detection import activation_clustering, data_features, spectral_signatures, strip
from linfjax.detection.detectors import DETECTORS, DetectorError

listing = importlib.import_module("linfjax.config.__main__")


def shifted_cluster(seed=0, per_class=200, poisoned=20, dims=16, shift=8.0):
  """Three classes of Gaussian features; in class 1, `poisoned` points shifted far along a
  random direction (a separable cluster). Returns features, labels, poisoned indices."""
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(3 * per_class, dims))
  labels = np.repeat(np.arange(3), per_class)
  direction = rng.normal(size=dims)
  poison = per_class + rng.choice(per_class, poisoned, replace=False)
  features[poison] += shift * direction / np.linalg.norm(direction)
  return features, labels, np.sort(poison)


def test_spectral_score_is_the_squared_projection_on_the_top_singular_vector():
  rng = np.random.default_rng(1)
  f = rng.normal(size=(30, 5)) * np.array([5.0, 1, 1, 1, 1])
  g = f - f.mean(0)
  # NumPy reference: the top eigenvector of the scatter matrix G^T G.
  values, vectors = np.linalg.eigh(g.T @ g)
  v = vectors[:, np.argmax(values)]
  np.testing.assert_allclose(spectral_signatures.scores(f), (g @ v) ** 2, rtol=1e-9)


def test_spectral_signatures_finds_the_shifted_cluster():
  features, labels, poison = shifted_cluster()
  flagged = spectral_signatures.detect(features, labels, expected_poison_fraction=0.1,
                                       classes=[1])
  assert len(flagged) == int(1.5 * 0.1 * 200)  # 30 flagged in class 1.
  precision, recall = data_features.precision_recall(flagged, poison)
  assert recall == 1.0 and precision == pytest.approx(20 / 30)
  # Over every class, 30 more per clean class are flagged; recall stays 1.
  everywhere = spectral_signatures.detect(features, labels, expected_poison_fraction=0.1)
  assert len(everywhere) == 90 and data_features.precision_recall(everywhere, poison)[1] == 1.0


def test_activation_clustering_flags_exactly_the_shifted_cluster():
  features, labels, poison = shifted_cluster()
  flagged = activation_clustering.detect(features, labels, dims=10, seed=0)
  precision, recall = data_features.precision_recall(flagged, poison)
  assert precision == 1.0 and recall == 1.0


def test_kmeans_splits_two_blobs_and_is_seeded():
  rng = np.random.default_rng(2)
  points = np.concatenate([rng.normal(size=(40, 2)), rng.normal(size=(10, 2)) + 20.0])
  ids = activation_clustering.kmeans(points, 2, seed=3)
  assert len(set(ids[:40])) == 1 and len(set(ids[40:])) == 1 and ids[0] != ids[-1]
  np.testing.assert_array_equal(ids, activation_clustering.kmeans(points, 2, seed=3))


def two_class_predict(images):
  """p(class 0) = the image's mean pixel: a blend of constant images a and b gives
  p = alpha a + (1 - alpha) b, whose entropy is known in closed form."""
  p = images.reshape(len(images), -1).mean(1)
  return np.stack([p, 1.0 - p], axis=1)


def binary_entropy(p):
  return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def test_strip_entropy_and_threshold_in_closed_form():
  overlays = np.stack([np.full((4, 4, 3), v, np.float32) for v in (0.2, 0.6)])
  clean = np.stack([np.full((4, 4, 3), v, np.float32) for v in np.linspace(0.3, 0.7, 11)])
  suspect = np.full((3, 4, 4, 3), 0.999, np.float32)
  result = strip.detect(two_class_predict, clean, suspect, overlays, num_overlays=50, frr=0.1)
  # Reference: each input's mean over its drawn overlays of H(0.5 a + 0.5 b).
  picks = np.random.default_rng(0).integers(2, size=(11, 50))
  a = np.linspace(0.3, 0.7, 11)[:, None]
  expected = binary_entropy(0.5 * a + 0.5 * np.array([0.2, 0.6])[picks]).mean(1)
  np.testing.assert_allclose(result.clean_entropy, expected, rtol=1e-5)
  assert result.threshold == pytest.approx(np.quantile(expected, 0.1), rel=1e-5)
  # 0.5 * 0.999 + 0.5 * b is 0.5995 or 0.7995: entropies 0.97 and 0.72, below every clean one.
  assert result.suspect_entropy.max() < result.clean_entropy.min()
  assert result.flagged.all() and result.far == 0.0
  assert result.frr == pytest.approx(np.mean(expected < result.threshold))


def test_precision_recall_and_frr_far():
  assert data_features.precision_recall([1, 2, 3, 4], [2, 4, 6]) == (0.5, pytest.approx(2 / 3))
  assert data_features.precision_recall([], [1]) == (1.0, 0.0)
  assert data_features.frr_far([True, False, False, False], [True, False]) == (0.25, 0.5)


@pytest.mark.parametrize("call, message", [
    (lambda f, y: spectral_signatures.detect(f, y, expected_poison_fraction=1.5),
     r"^expected_poison_fraction: must be a number in \(0, 1\), got 1.5$"),
    (lambda f, y: activation_clustering.detect(f, y, dims=17),
     r"^dims: must be an integer in \[1, 16\] \(the number of features\), got 17$"),
    (lambda f, y: activation_clustering.detect(f, y, size_threshold=0.0),
     r"^size_threshold: must be a number in \(0, 1\), got 0.0$"),
    (lambda f, y: spectral_signatures.detect(f, y[:5], expected_poison_fraction=0.1),
     r"^features must be \[N, D\] and labels \[N\]; got \(600, 16\) and \(5,\)$"),
    (lambda f, y: strip.detect(two_class_predict, f, f, f, frr=0),
     r"^frr: must be a number in \(0, 1\), got 0$"),
])
def test_bad_settings_give_one_line_errors(call, message):
  features, labels, _ = shifted_cluster()
  with pytest.raises(DetectorError, match=message):
    call(features, labels)


def test_registry_end_to_end_on_a_tiny_model():
  model = models.create("cnn", num_classes=3, width=0.25)
  variables = models.init(model, jax.random.PRNGKey(0), (8, 8, 3))
  images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
  features = data_features.penultimate_features(model, variables, images, batch_size=8)
  logits, _ = model.apply(variables, images[:3].astype(np.float32) / 255.0)
  kernel, bias = (np.asarray(variables["params"]["head"][k]) for k in ("kernel", "bias"))
  np.testing.assert_allclose(features[:3] @ kernel + bias[None], logits, rtol=1e-4,
                             atol=1e-4)
  labels = np.arange(20) % 2
  flagged = DETECTORS["spectral_signatures"].run(features, labels, expected_poison_fraction=0.2)
  assert len(flagged) == 2 * int(1.5 * 0.2 * 10)
  dims = min(10, features.shape[1])
  assert DETECTORS["activation_clustering"].run(features, labels, dims=dims).ndim == 1
  predict = lambda x: jax.nn.softmax(model.apply(variables, x)[0])
  result = DETECTORS["strip"].run(predict, images[:6], images[6:9], images[10:], num_overlays=4)
  assert result.flagged.shape == (3,) and 0.0 <= result.frr <= 1.0
  assert "  spectral_signatures: " in listing.registries()
