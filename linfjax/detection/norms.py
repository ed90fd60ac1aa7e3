"""l1, l2 and linf of every neuron's activation map, streamed over a dataset, and shifts.

docs/method.md ("Activation norms"): neuron `k` of a layer with output `A` of shape
`[H', W', K]` has the map `A_k`; its norms are `l1 = sum |A_k|`,
`l2 = sqrt(sum A_k^2)` and `linf = max |A_k|`; beside them, on request, the signed
`sum = sum A_k` (not a norm: Fine-Pruning's mean activation is `sum / (H' W')`, which
differs from `l1 / (H' W')` where the map can be negative, as a residual sum without a ReLU).
All of them, for every probe layer, come from one forward pass over a batch that stacks
the clean images and their triggered copies. Over a dataset, per-neuron means and
standard deviations are kept as running moments (Chan et al.'s pairwise merge, float64 on
the host), so memory does not grow with the number of images; every batch is padded to one
size and masked, so one compiled function serves the whole dataset.

The trigger-induced shift of neuron `k` under norm `p` is
`delta_k = mean ||A_k(T(x))||_p - mean ||A_k(x)||_p`; `summarize` reduces a
layer's shifts to docs/method.md's `z`, `top1_share` and `rel`.

References:
  Chan, Golub and LeVeque, "Updating Formulae and a Pairwise Algorithm for
  Computing Sample Variances", 1979.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from linfjax import data, pixels
from linfjax import attacks

NORMS = ("l1", "l2", "linf")
# Every per-neuron statistic `activation_norms` computes: the norms, then the signed sum of the
# map. NORMS is a prefix, so a norm's index is the same in either axis.
STATISTICS = NORMS + ("sum",)
# `rel` divides by a neuron's clean norm; a (near-)dead neuron's is floored at this share of
# the layer's mean clean norm, so a neuron that only fires under the trigger gives a large
# but finite relative shift.
REL_FLOOR = 0.01


def activation_norms(activation: jax.Array, norms: Sequence[str] = NORMS) -> jax.Array:
  """Norms (and, when asked, the signed sum) of every neuron's activation map.

  Args:
    activation: [B, H', W', K] layer output.
    norms: which of STATISTICS to compute, in this order.

  Returns:
    [len(norms), B, K] float32.
  """
  chex.assert_rank(activation, 4)
  signed = activation.astype(jnp.float32)
  magnitude = jnp.abs(signed)
  reductions = {
      "l1": lambda: jnp.sum(magnitude, axis=(1, 2)),
      "l2": lambda: jnp.sqrt(jnp.sum(jnp.square(magnitude), axis=(1, 2))),
      "linf": lambda: jnp.max(magnitude, axis=(1, 2)),
      "sum": lambda: jnp.sum(signed, axis=(1, 2)),
  }
  unknown = [norm for norm in norms if norm not in reductions]
  if unknown:
    raise KeyError(f"unknown norm(s) {unknown}; known: {', '.join(STATISTICS)}")
  return jnp.stack([reductions[norm]() for norm in norms])


class Moments(NamedTuple):
  """Running per-neuron statistics of one layer, float64 on the host.

  count: images seen. mean, m2: [conditions, norms, K], the mean and the sum of squared
  deviations from it; condition 0 is the clean images, condition `i` the images under
  trigger `i - 1`.
  """
  count: float
  mean: np.ndarray
  m2: np.ndarray

  @property
  def std(self) -> np.ndarray:
    """Population standard deviation (ddof 0), [conditions, norms, K]."""
    return np.sqrt(self.m2 / max(self.count, 1.0))


def merge(a: Moments, b: Moments) -> Moments:
  """Chan et al.'s pairwise merge of the moments of two disjoint sets of images."""
  count = a.count + b.count
  if count == 0:
    return a
  delta = b.mean - a.mean
  mean = a.mean + delta * (b.count / count)
  m2 = a.m2 + b.m2 + np.square(delta) * (a.count * b.count / count)
  return Moments(count, mean, m2)


def batch_moments(variables, images: jax.Array, valid: jax.Array,
                  trigger_list: Sequence[attacks.Trigger], *, apply_fn: Callable,
                  norms: Sequence[str] = NORMS) -> dict[str, tuple]:
  """One forward pass over clean and triggered images; per-layer masked batch moments.

  Args:
    variables: the model's variables.
    images: [B, H, W, C], uint8 pixels or floats in [0, 1].
    valid: [B] bool, False on padding rows.
    trigger_list: T triggers; the pass runs on B * (1 + T) images.
    apply_fn: `model.apply`, returning (logits, {layer: [N, H', W', K]}).
    norms: which of STATISTICS to compute.

  Returns:
    layer -> (count [], mean [1 + T, len(norms), K], m2 [1 + T, len(norms), K]).
  """
  x = pixels.to_unit_float(images)
  batch = x.shape[0]
  stacked = jnp.concatenate([x] + [attacks.apply(t, x) for t in trigger_list])
  _, activations = apply_fn(variables, stacked)
  conditions = 1 + len(trigger_list)
  weight = valid.astype(jnp.float32).reshape(1, 1, batch, 1)
  count = jnp.sum(valid.astype(jnp.float32))
  moments = {}
  for layer, activation in activations.items():
    values = activation_norms(activation, norms)
    values = values.reshape(len(norms), conditions, batch, -1).transpose(1, 0, 2, 3)
    mean = jnp.sum(values * weight, axis=2) / jnp.maximum(count, 1.0)
    m2 = jnp.sum(jnp.square(values - mean[:, :, None, :]) * weight, axis=2)
    moments[layer] = (count, mean, m2)
  return moments


@functools.lru_cache(maxsize=None)
def _compiled_batch_moments(apply_fn: Callable, norms: tuple[str, ...]) -> Callable:
  return jax.jit(functools.partial(batch_moments, apply_fn=apply_fn, norms=norms))


def norm_statistics(apply_fn: Callable, variables, images: np.ndarray,
                    trigger_list: Sequence[attacks.Trigger] = (), *, batch_size: int,
                    norms: Sequence[str] = NORMS,
                    on_batch: Callable[[], None] | None = None) -> dict[str, Moments]:
  """Per-neuron norm statistics of every probe layer over a dataset, clean and triggered.

  Args:
    apply_fn: `model.apply` of a model built with the wanted `probe_layers`.
    variables: the model's variables.
    images: [N, H, W, C], uint8 pixels or floats in [0, 1] (anything sliceable).
    trigger_list: the triggers whose effect is measured (condition i + 1 is trigger i).
    batch_size: images per forward pass (each pass holds `batch_size * (1 + T)` images).
    norms: which of STATISTICS to compute (all in the same pass).
    on_batch: called after every batch (a progress bar's update).

  Returns:
    layer -> Moments with mean and m2 of shape [1 + T, len(norms), K].
  """
  step = _compiled_batch_moments(apply_fn, tuple(norms))
  trigger_list = tuple(trigger_list)
  totals = {}
  for (batch,), num_valid in data.padded_batches(batch_size, images):
    valid = np.arange(batch_size) < num_valid
    for layer, (count, mean, m2) in step(variables, batch, valid, trigger_list).items():
      current = Moments(float(count), np.asarray(mean, np.float64), np.asarray(m2, np.float64))
      totals[layer] = merge(totals[layer], current) if layer in totals else current
    if on_batch is not None:
      on_batch()
  return totals


def shifts(moments: Moments) -> np.ndarray:
  """`delta_k` of every triggered condition: [T, norms, K] (triggered mean - clean mean)."""
  return moments.mean[1:] - moments.mean[:1]


def summarize(delta: jax.Array, clean_mean: jax.Array) -> dict[str, jax.Array]:
  """docs/method.md's summary of one layer's shifts under one norm.

  Args:
    delta: [K] per-neuron shifts `delta_k`.
    clean_mean: [K] per-neuron clean mean norms `mean_x ||A_k(x)||_p`.

  Returns:
    z: `(max_k delta_k - mean_k delta_k) / std_k delta_k`, population std (0 when all
      shifts are equal);
    top1_share: share of the total positive shift carried by the top 1 % of neurons (at
      least one), ranked by shift (0 when no shift is positive);
    rel: the largest shift in units of its neuron's clean norm,
      `delta_k* / mean_x ||A_k*(x)||_p` with `k* = argmax_k delta_k`; the denominator is
      floored at REL_FLOOR times the layer's mean clean norm.
  """
  chex.assert_rank([delta, clean_mean], 1)
  chex.assert_equal_shape([delta, clean_mean])
  delta = delta.astype(jnp.float32)
  clean_mean = clean_mean.astype(jnp.float32)
  num_neurons = delta.shape[0]
  largest = jnp.max(delta)
  spread = jnp.std(delta)
  z = jnp.where(spread > 0, (largest - jnp.mean(delta)) / jnp.where(spread > 0, spread, 1.0), 0.0)
  positive = jnp.maximum(delta, 0.0)
  top, _ = jax.lax.top_k(positive, max(1, num_neurons // 100))
  total = jnp.sum(positive)
  top1_share = jnp.where(total > 0, jnp.sum(top) / jnp.where(total > 0, total, 1.0), 0.0)
  floor = jnp.maximum(REL_FLOOR * jnp.mean(clean_mean), jnp.finfo(jnp.float32).tiny)
  rel = largest / jnp.maximum(clean_mean[jnp.argmax(delta)], floor)
  return {"z": z, "top1_share": top1_share, "rel": rel}


_compiled_summarize = jax.jit(summarize)


def layer_summary(moments: Moments, condition: int,
                  norms: Sequence[str] = NORMS) -> dict[str, dict[str, float]]:
  """`summarize` for every norm of one layer under triggered condition `condition` (0-based).

  `norms` names the norm axis of `moments` (the `norms` they were computed with).
  """
  delta = shifts(moments)[condition]
  return {norm: {key: float(value) for key, value in
                 _compiled_summarize(delta[i], moments.mean[0, i]).items()}
          for i, norm in enumerate(norms)}
