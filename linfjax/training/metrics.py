"""CA, ASR and RA in one pass over a test split, and the defense effectiveness rating.

Percentages in [0, 100], as docs/method.md's "Metrics" defines them:
  CA:  accuracy on the clean test images;
  ASR: among test images the attack can flip (label != target for all-to-one; all
       images for all-to-all), the share classified as the attack's label after T;
  RA:  among the same triggered images, the share classified as their true label.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from linfjax import data, pixels
from linfjax import attacks
from linfjax.attacks import poison


def attack_metrics(clean_predictions, triggered_predictions, labels, *, target: int,
                   mode: str, num_classes: int) -> dict[str, float]:
  """CA, ASR and RA from predicted classes ([N] ints each) and true labels ([N])."""
  clean_predictions = np.asarray(clean_predictions)
  triggered_predictions = np.asarray(triggered_predictions)
  labels = np.asarray(labels)
  attack_labels = np.asarray(poison.poisoned_labels(labels, mode=mode, target=target,
                                                    num_classes=num_classes))
  attackable = labels != attack_labels
  if not attackable.any():
    raise ValueError("no test image has a label other than the attack's label; ASR is undefined")
  return {
      "CA": 100.0 * float(np.mean(clean_predictions == labels)),
      "ASR": 100.0 * float(np.mean(triggered_predictions[attackable] == attack_labels[attackable])),
      "RA": 100.0 * float(np.mean(triggered_predictions[attackable] == labels[attackable])),
  }


def der(*, ca_before: float, ca_after: float, asr_before: float, asr_after: float) -> float:
  """Defense effectiveness rating (BackdoorBench): `(max(0, dASR) - max(0, dCA) + 100) / 2`."""
  d_ca = ca_before - ca_after
  d_asr = asr_before - asr_after
  return (max(0.0, d_asr) - max(0.0, d_ca) + 100.0) / 2.0


def _predict_clean_and_triggered(variables, images, trigger, *, apply_fn):
  images = pixels.to_unit_float(images)
  both = jnp.concatenate([images, attacks.apply(trigger, images)])
  logits, _ = apply_fn(variables, both)
  predictions = jnp.argmax(logits, -1)
  return jnp.split(predictions, 2)


@functools.lru_cache(maxsize=None)
def _compiled_predict(apply_fn: Callable) -> Callable:
  return jax.jit(functools.partial(_predict_clean_and_triggered, apply_fn=apply_fn))


def predict_clean_and_triggered(apply_fn: Callable, variables, images: np.ndarray,
                                trigger: attacks.Trigger, *, batch_size: int):
  """Predicted classes of the clean and the triggered images, in one forward pass per batch.

  Batches are padded to `batch_size` so that one compiled function serves the whole split.
  """
  predict = _compiled_predict(apply_fn)
  clean, triggered = [], []
  for (batch,), valid in data.padded_batches(batch_size, images):
    clean_batch, triggered_batch = predict(variables, batch, trigger)
    clean.append(np.asarray(clean_batch)[:valid])
    triggered.append(np.asarray(triggered_batch)[:valid])
  return np.concatenate(clean), np.concatenate(triggered)


def evaluate(apply_fn: Callable, variables, images: np.ndarray, labels: np.ndarray,
             trigger: attacks.Trigger, *, target: int, mode: str, num_classes: int,
             batch_size: int) -> dict[str, float]:
  """CA, ASR and RA of a model on a labelled split, in one pass."""
  clean, triggered = predict_clean_and_triggered(apply_fn, variables, images, trigger,
                                                 batch_size=batch_size)
  return attack_metrics(clean, triggered, labels, target=target, mode=mode,
                        num_classes=num_classes)
