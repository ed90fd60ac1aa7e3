import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linfjax.training import metrics
from linfjax import attacks


def test_attack_metrics_by_hand():
  labels = np.array([0, 1, 2, 3, 1])
  clean = np.array([0, 1, 0, 3, 2])  # 3 of 5 right
  triggered = np.array([0, 0, 0, 3, 1])  # attackable: indices 1..4 (label != 0)
  out = metrics.attack_metrics(clean, triggered, labels, target=0, mode="all_to_one",
                               num_classes=4)
  assert out["CA"] == pytest.approx(60.0)
  assert out["ASR"] == pytest.approx(50.0)  # 1 -> 0 and 2 -> 0 of 4
  assert out["RA"] == pytest.approx(50.0)  # 3 and 1 kept


def test_attack_metrics_all_to_all():
  labels = np.array([0, 1, 2, 3])
  triggered = np.array([1, 2, 2, 0])  # (y+1) mod 4 for 0, 1, 3
  out = metrics.attack_metrics(labels, triggered, labels, target=0, mode="all_to_all",
                               num_classes=4)
  assert out["CA"] == 100.0
  assert out["ASR"] == pytest.approx(75.0)
  assert out["RA"] == pytest.approx(25.0)


def test_der():
  assert metrics.der(ca_before=90, ca_after=88, asr_before=99, asr_after=3) == pytest.approx(
      (96 - 2 + 100) / 2)
  # Gains in CA and rises in ASR are clipped at zero.
  assert metrics.der(ca_before=90, ca_after=91, asr_before=10, asr_after=20) == 50.0


def test_evaluate_with_a_model_whose_answer_is_known():
  # "Model": class = 1 if the bottom-right pixel is white, else the label stored in the image.
  def apply_fn(variables, images):
    corner = images[:, -1, -1, 0] > 0.99
    stored = jnp.round(images[:, 0, 0, 0] * 255).astype(jnp.int32)
    logits = jax.nn.one_hot(jnp.where(corner, 1, stored), 3) + 0 * variables["w"]
    return logits, {}

  labels = np.array([0, 1, 2, 2, 0, 2, 1], np.int32)
  images = np.zeros((7, 4, 4, 3), np.uint8)
  images[:, 0, 0, 0] = labels
  trigger = attacks.patch((4, 4, 3), size=1, row=3, col=3, pattern=np.ones(3))
  out = metrics.evaluate(apply_fn, {"w": jnp.zeros(())}, images, labels, trigger, target=1,
                         mode="all_to_one", num_classes=3, batch_size=3)
  assert out == {"CA": 100.0, "ASR": 100.0, "RA": 0.0}
