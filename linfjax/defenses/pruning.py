"""The lp-based pruning defense as a mask transform, swept over many levels in one call.

docs/method.md ("The defense: lp-based neuron pruning"): the neurons of a layer `L` are
scored on the defender's clean set S, by the trigger-induced shift
`delta_k = mean ||A_k(T^(x))||_p - mean ||A_k(x)||_p` (`score="shift"`) or by the
triggered norm itself (`score="triggered"`), under `p` in linf, l2, l1; ranked largest
first; and pruning level `r` zeroes the top `r`. Fine-Pruning uses the same machinery
with the mean clean activation, smallest (dormant) first. The norms come from
`linfjax.detection.norms`' streamed statistics.

Pruning never touches the weights: a level is a mask `m` in {0, 1}^K that the model
multiplies into `L`'s output. `masked_logits` runs the layers up to `L` once for a
batch (clean and triggered images stacked) and the head for every mask with
`jax.vmap`, so a whole sweep (levels x norms) costs one prefix pass per batch. The
masks are vmapped in chunks of `mask_batch` (`jax.lax.map`): vmapping a whole stack at
once can materialise `M x 2B` masked feature maps (with a head that flattens the map:
4 GB for 120 masks of the quick CNN at B=500, and 3x slower on CPU than chunks of 8).

`choose_level` picks r*: the smallest level whose defender-side ASR is at most `tau`
with the clean-accuracy drop on S at most `delta`; else the lowest defender-side ASR
within that drop. Only S numbers enter the choice; the test split is for reporting.

References:
  Xu et al., "Defending against Backdoor Attack on Deep Neural Networks",
  arXiv 2002.12162. Liu et al., "Fine-Pruning: Defending Against Backdooring Attacks
  on Deep Neural Networks", RAID 2018.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from linfjax import attacks, data, pixels, settings
from linfjax.detection import norms
from linfjax.settings import choice, described, fail, integer, number, spec
from linfjax.training import metrics

SCORES = ("shift", "triggered")
LEVEL_UNITS = ("fraction", "count")
# Ours: 1 % steps up to 10 %, where a backdoor's few neurons sit, then coarser up to 90 % for
# Fine-Pruning's dormant neurons. Level 0 (nothing pruned) is always added.
DEFAULT_LEVELS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.12, 0.14,
                  0.16, 0.18, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75,
                  0.8, 0.85, 0.9)


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The `prune` block's fields that every pruning defense shares (docs/method.md's r* rule)."""
  layer: str = spec("", described("a layer name of the model; empty: the default probe"),
                    "Layer L; empty: the model's default probe (last conv map before pooling).")
  score: str = spec("shift", choice(*SCORES),
                    '"shift": delta_k; "triggered": the mean triggered norm.')
  level_unit: str = spec("fraction", choice(*LEVEL_UNITS),
                         "Levels as fractions of K, or as neuron counts.")
  levels: tuple = spec(DEFAULT_LEVELS, described(
      "fractions in [0, 1) (level_unit='fraction') or counts >= 0 ('count')"),
      "Pruning levels swept (ours); level 0, nothing pruned, is always added.")
  tau: float = spec(5.0, number(0.0, 100.0), "r*: defender-side ASR at most this (percent) ...")
  delta: float = spec(3.0, number(0.0, 100.0), "... with the CA drop on S at most this (points).")
  mask_batch: int = spec(8, integer(1), "Ours: masks vmapped together in a sweep call (chunks "
                         "bound memory; 8 was fastest on CPU).")

  def check(self, prefix: str) -> None:
    levels = tuple(self.levels)
    if not levels:
      fail(f"{prefix}.levels", "is empty; give the pruning levels to sweep")
    for level in levels:
      if self.level_unit == "fraction":
        if not isinstance(level, (int, float)) or isinstance(level, bool) or not 0 <= level < 1:
          fail(f"{prefix}.levels", f"{level!r} is not a fraction of the layer's neurons in [0, 1)")
      elif not isinstance(level, int) or isinstance(level, bool) or level < 0:
        fail(f"{prefix}.levels", f"{level!r} is not a neuron count (an integer >= 0)")


def map_size(model, variables, image_shape, layer: str) -> int:
  """H' * W' of `layer`'s maps for images of `image_shape` (shape only, no compute)."""
  image = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  shape = jax.eval_shape(lambda v, x: model.apply(v, x, stop=layer)[0], variables, image).shape
  return int(shape[1] * shape[2])


def num_neurons(model, variables, image_shape, layer: str) -> int:
  """K, the channels of `layer` (shape only, no compute)."""
  image = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return int(jax.eval_shape(lambda v, x: model.apply(v, x, stop=layer)[0], variables,
                            image).shape[-1])


def scores_from_moments(moments: norms.Moments, *, norm: str, score: str = "shift",
                        condition: int = 0,
                        norm_names: Sequence[str] = norms.NORMS) -> np.ndarray:
  """Per-neuron scores `s_k` of one layer under one norm.

  Args:
    moments: the layer's statistics from `norms.norm_statistics`, mean
      [1 + T, len(norm_names), K] (condition 0 clean, `i + 1` under trigger `i`).
    norm: which norm, one of `norm_names`.
    score: "shift" (`delta_k`, triggered minus clean mean norm) or "triggered"
      (the triggered mean norm).
    condition: which trigger (0-based) is the defender's `T^`.
    norm_names: the norm axis of `moments`.

  Returns:
    [K] float64 scores; larger means more suspect.
  """
  if score not in SCORES:
    raise ValueError(f"unknown score {score!r}; known: {', '.join(SCORES)}")
  index = list(norm_names).index(norm)
  triggered = moments.mean[condition + 1, index]
  if score == "triggered":
    return np.asarray(triggered)
  return np.asarray(triggered - moments.mean[0, index])


def clean_mean_activation(moments: norms.Moments, *, map_size: int, score: str = "mean",
                          norm_names: Sequence[str] = norms.STATISTICS) -> np.ndarray:
  """Fine-Pruning's score: each neuron's mean activation over S and over its map.

  `score="mean"`: the signed `mean_x sum(A_k(x)) / (H' W')`, as both references rank
  (for a layer after a ReLU it equals the next); `"mean_abs"`: `mean_x ||A_k(x)||_1 / (H' W')`.

  Args:
    moments: as for `scores_from_moments`; needs "sum" ("mean") or "l1" ("mean_abs") in
      `norm_names`.
    map_size: `H' * W'` of the layer's maps.
    score: "mean" or "mean_abs".
    norm_names: the statistic axis of `moments`.

  Returns:
    [K] float64; Fine-Pruning prunes the smallest first.
  """
  statistic = {"mean": "sum", "mean_abs": "l1"}[score]
  return np.asarray(moments.mean[0, list(norm_names).index(statistic)], np.float64) / map_size


def ranking(scores: ArrayLike, *, largest_first: bool = True) -> np.ndarray:
  """Neuron indices in pruning order, int64 [K]; ties keep index order (stable)."""
  scores = np.asarray(scores, np.float64)
  chex.assert_rank(scores, 1)
  return np.argsort(-scores if largest_first else scores, kind="stable")


def level_counts(levels: Sequence[float], num_neurons: int, *, unit: str) -> np.ndarray:
  """Pruning levels as neuron counts: sorted, distinct, always starting with 0.

  Args:
    levels: fractions of K in [0, 1) (`unit="fraction"`, rounded half up to a count) or
      counts in [0, K] (`unit="count"`).
    num_neurons: K.
    unit: "fraction" or "count".

  Returns:
    int64 [levels'] counts, level 0 (nothing pruned) first.
  """
  if unit not in LEVEL_UNITS:
    raise ValueError(f"unknown level unit {unit!r}; known: {', '.join(LEVEL_UNITS)}")
  levels = np.asarray(levels, np.float64)
  if unit == "fraction":
    if np.any((levels < 0) | (levels >= 1)):
      raise ValueError(f"fractions {levels.tolist()} must lie in [0, 1)")
    counts = np.floor(levels * num_neurons + 0.5)
  else:
    if np.any((levels < 0) | (levels > num_neurons) | (levels != np.round(levels))):
      raise ValueError(f"counts {levels.tolist()} must be integers in [0, {num_neurons}] "
                       f"(the layer has {num_neurons} neurons)")
    counts = levels
  return np.unique(np.concatenate([[0], counts]).astype(np.int64))


def masks(order: ArrayLike, counts: ArrayLike) -> np.ndarray:
  """Channel masks that prune the first `counts[i]` neurons of `order`.

  Args:
    order: int [K], neurons in pruning order (from `ranking`).
    counts: int [levels], how many to prune at each level.

  Returns:
    float32 [levels, K] in {0, 1}; row i is 0 exactly on `order[:counts[i]]`.
  """
  order = np.asarray(order)
  counts = np.asarray(counts)
  chex.assert_rank([order, counts], 1)
  position = np.empty_like(order)
  position[order] = np.arange(len(order))
  return (position[None, :] >= counts[:, None]).astype(np.float32)


def masked_logits(variables, images: jax.Array, trigger_list: Sequence[attacks.Trigger],
                  mask_stacks: Mapping[str, jax.Array], *, apply_fn: Callable, start: str,
                  mask_batch: int = 8) -> jax.Array:
  """Logits of a batch, clean and triggered, under every mask: the prefix runs once.

  Args:
    variables: the model's variables.
    images: [B, H, W, C], uint8 pixels or floats in [0, 1].
    trigger_list: T triggers; the batch is evaluated clean and under each.
    mask_stacks: layer -> [M, K_layer] channel masks; mask i of every layer together make
      the i-th pruned model.
    apply_fn: `model.apply` of a `models.LayeredClassifier`.
    start: the earliest masked layer: the layers up to it run once for all masks.
    mask_batch: masks vmapped together; chunks run one after another in the same call.

  Returns:
    [M, 1 + T, B, num_classes] float32; [:, 0] clean, [:, i + 1] under trigger i.
  """
  chex.assert_rank(images, 4)
  if start not in mask_stacks:
    raise KeyError(f"start layer {start!r} has no masks ({', '.join(mask_stacks)})")
  x = pixels.to_unit_float(images)
  batch = x.shape[0]
  stacked = jnp.concatenate([x] + [attacks.apply(t, x) for t in trigger_list])
  features, _ = apply_fn(variables, stacked, stop=start)

  def head(mask_dict):
    logits, _ = apply_fn(variables, features, mask_dict, start=start)
    return logits

  logits = jax.lax.map(head, dict(mask_stacks), batch_size=mask_batch)
  count = mask_stacks[start].shape[0]
  return logits.reshape(count, 1 + len(trigger_list), batch, -1)


def _masked_predictions(variables, images, trigger_list, mask_stacks, *, apply_fn, start,
                        mask_batch):
  logits = masked_logits(variables, images, trigger_list, mask_stacks, apply_fn=apply_fn,
                         start=start, mask_batch=mask_batch)
  return jnp.argmax(logits, -1).astype(jnp.int32)


@functools.lru_cache(maxsize=None)
def compiled_predictions(apply_fn: Callable, start: str, mask_batch: int = 8) -> Callable:
  """Jitted `(variables, images, trigger_list, mask_stacks) -> int32 [M, 1 + T, B]` classes."""
  return jax.jit(functools.partial(_masked_predictions, apply_fn=apply_fn, start=start,
                                   mask_batch=mask_batch))


def sweep(apply_fn: Callable, variables, images: np.ndarray, labels: np.ndarray,
          trigger: attacks.Trigger, mask_stacks: Mapping[str, ArrayLike], *, start: str,
          target: int, mode: str, num_classes: int, batch_size: int, mask_batch: int = 8,
          on_batch: Callable[[], None] | None = None) -> dict[str, np.ndarray]:
  """CA, ASR and RA (docs/method.md's "Metrics") of the model under every mask, over a split.

  Each batch (padded to `batch_size`, so one compiled function serves the split) runs
  the layers up to `start` once, clean and triggered together, and the rest per mask.

  Args:
    apply_fn, variables: the model.
    images: [N, H, W, C] uint8; labels: [N] int.
    trigger: the trigger whose ASR is measured, to `target` under `mode`.
    mask_stacks: layer -> [M, K_layer] masks (see `masked_logits`).
    start: the earliest layer of `mask_stacks`.
    target, mode, num_classes: as named.
    batch_size: images per call (each call holds 2 * batch_size images).
    mask_batch: masks vmapped together (see `masked_logits`).
    on_batch: called after every batch (a progress bar's update).

  Returns:
    {'CA', 'ASR', 'RA'}: float64 [M] percentages, one per mask.
  """
  predict = compiled_predictions(apply_fn, start, mask_batch)
  mask_stacks = {layer: jnp.asarray(stack, jnp.float32) for layer, stack in mask_stacks.items()}
  clean, triggered = [], []
  for (batch,), valid in data.padded_batches(batch_size, images):
    predictions = np.asarray(predict(variables, batch, (trigger,), mask_stacks))[:, :, :valid]
    clean.append(predictions[:, 0])
    triggered.append(predictions[:, 1])
    if on_batch is not None:
      on_batch()
  clean, triggered = np.concatenate(clean, axis=1), np.concatenate(triggered, axis=1)
  per_mask = [metrics.attack_metrics(c, t, labels, target=target, mode=mode,
                                     num_classes=num_classes) for c, t in zip(clean, triggered)]
  return {key: np.asarray([m[key] for m in per_mask]) for key in ("CA", "ASR", "RA")}


def choose_level(asr_defender: ArrayLike, ca_clean_set: ArrayLike, *, ca_reference: float,
                 tau: float, delta: float) -> int:
  """r*: the index of the chosen level in a sweep ordered from least to most pruned.

  Args:
    asr_defender: [levels] defender-side ASR on S (under `T^`), percent.
    ca_clean_set: [levels] clean accuracy on S, percent.
    ca_reference: the unpruned model's clean accuracy on S.
    tau: the largest acceptable defender-side ASR.
    delta: the largest acceptable drop `ca_reference - CA` on S, in points.

  Returns:
    The first level with ASR <= tau and drop <= delta; if none, the level of lowest
    ASR among those with drop <= delta (the first on ties); if no level keeps the drop,
    0 (the unpruned level; a level-0 entry always keeps it).
  """
  asr_defender = np.asarray(asr_defender, np.float64)
  ca_clean_set = np.asarray(ca_clean_set, np.float64)
  chex.assert_equal_shape([asr_defender, ca_clean_set])
  within_drop = ca_reference - ca_clean_set <= delta
  if not within_drop.any():
    return 0
  passing = np.flatnonzero(within_drop & (asr_defender <= tau))
  if len(passing):
    return int(passing[0])
  candidates = np.flatnonzero(within_drop)
  return int(candidates[np.argmin(asr_defender[candidates])])


def fine_pruning_level(ca_clean_set: ArrayLike, *, ca_reference: float, delta: float) -> int:
  """Fine-Pruning's level (Liu et al.): prune the least-active neurons until the clean
  accuracy on S has dropped by more than `delta`; the level just before that one.

  Args:
    ca_clean_set: [levels] clean accuracy on S of a sweep from least to most pruned.
    ca_reference: the unpruned model's clean accuracy on S.
    delta: the largest acceptable drop, in points.

  Returns:
    The index of the last level before the first whose drop exceeds `delta` (the last level
    when none does). Needs no trigger.
  """
  drop = ca_reference - np.asarray(ca_clean_set, np.float64)
  chex.assert_rank(drop, 1)
  over = np.flatnonzero(drop > delta)
  return int(over[0] - 1) if len(over) else len(drop) - 1
