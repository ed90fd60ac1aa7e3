"""Activation norms against NumPy, streamed statistics, and the shift summaries by hand."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linfjax.detection import norms
from linfjax import attacks


def test_norms_match_numpy():
  activation = np.asarray(jax.random.normal(jax.random.key(0), (3, 5, 4, 6)))
  got = jax.jit(norms.activation_norms)(activation)
  assert got.shape == (3, 3, 6)
  np.testing.assert_allclose(got[0], np.abs(activation).sum(axis=(1, 2)), rtol=1e-5)
  np.testing.assert_allclose(got[1], np.sqrt((activation ** 2).sum(axis=(1, 2))), rtol=1e-5)
  np.testing.assert_allclose(got[2], np.abs(activation).max(axis=(1, 2)), rtol=1e-6)
  only_linf = jax.jit(functools.partial(norms.activation_norms, norms=("linf",)))(activation)
  np.testing.assert_array_equal(only_linf[0], got[2])
  with pytest.raises(KeyError, match="l3"):
    norms.activation_norms(activation, ("l3",))
  # The signed sum beside the norms (Fine-Pruning's mean activation), NORMS' indices kept.
  every = jax.jit(functools.partial(norms.activation_norms, norms=norms.STATISTICS))(activation)
  assert norms.STATISTICS[:3] == norms.NORMS and every.shape == (4, 3, 6)
  np.testing.assert_array_equal(every[:3], got)
  np.testing.assert_allclose(every[3], activation.sum(axis=(1, 2)), rtol=1e-5, atol=1e-5)
  assert np.any(every[3] < 0) and not np.allclose(every[3], every[0])


def _two_layer_apply(variables, x):
  """A stand-in model: two 'layers' of different shapes, no logits needed."""
  first = jax.nn.relu(jnp.einsum("bhwc,ck->bhwk", x, variables["w1"]) - 0.5)
  pooled = first.reshape(x.shape[0], 8, 4, 8, 4, -1).max(axis=(2, 4))
  second = jnp.tanh(jnp.einsum("bhwk,kj->bhwj", pooled, variables["w2"]))
  return None, {"first": first, "second": second}


def test_streamed_statistics_over_uneven_batches_equal_one_shot_numpy():
  variables = {"w1": jax.random.normal(jax.random.key(0), (3, 5)),
               "w2": jax.random.normal(jax.random.key(1), (5, 6))}
  images = np.asarray(jax.random.randint(jax.random.key(2), (23, 32, 32, 3), 0, 256), np.uint8)
  real = attacks.patch((32, 32, 3), size=4, row=28, col=28, pattern=np.ones(3))
  blend = attacks.blend((32, 32, 3), alpha=0.3, pattern=attacks.noise_pattern((32, 32, 3), 1))
  calls = []
  stats = norms.norm_statistics(_two_layer_apply, variables, images, [real, blend],
                                batch_size=7, on_batch=lambda: calls.append(1))
  assert len(calls) == 4  # 7 + 7 + 7 + 2 (padded and masked)
  x = images.astype(np.float32) / 255.0
  inputs = [x, np.asarray(attacks.apply(real, x)), np.asarray(attacks.apply(blend, x))]
  for condition, condition_inputs in enumerate(inputs):
    _, activations = jax.jit(_two_layer_apply)(variables, condition_inputs)
    for layer, k in (("first", 5), ("second", 6)):
      a = np.abs(np.asarray(activations[layer], np.float64))
      per_image = np.stack([a.sum(axis=(1, 2)), np.sqrt((a ** 2).sum(axis=(1, 2))),
                            a.max(axis=(1, 2))])
      assert stats[layer].count == 23
      assert stats[layer].mean.shape == (3, 3, k)
      np.testing.assert_allclose(stats[layer].mean[condition], per_image.mean(axis=1),
                                 rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(stats[layer].std[condition], per_image.std(axis=1),
                                 rtol=1e-4, atol=1e-5)
  assert not np.allclose(stats["second"].mean[1], stats["second"].mean[0])
  with_sum = norms.norm_statistics(_two_layer_apply, variables, images, [real], batch_size=7,
                                   norms=norms.STATISTICS)
  _, activations = jax.jit(_two_layer_apply)(variables, x)
  signed = np.asarray(activations["second"], np.float64).sum(axis=(1, 2))  # tanh: both signs.
  np.testing.assert_allclose(with_sum["second"].mean[0, 3], signed.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(with_sum["second"].std[0, 3], signed.std(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(with_sum["second"].mean[:, :3], stats["second"].mean[:2],
                             rtol=1e-6)
  one_norm = norms.norm_statistics(_two_layer_apply, variables, images, [real], batch_size=10,
                                   norms=("l2",))
  np.testing.assert_allclose(one_norm["first"].mean[:, 0], stats["first"].mean[:2, 1], rtol=1e-5)


def test_merge_of_moments_is_exact():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(5, 3)), rng.normal(3.0, 2.0, size=(9, 3))
  moments = lambda v: norms.Moments(len(v), v.mean(0), ((v - v.mean(0)) ** 2).sum(0))
  merged = norms.merge(moments(a), moments(b))
  both = np.concatenate([a, b])
  np.testing.assert_allclose(merged.mean, both.mean(0))
  np.testing.assert_allclose(merged.std, both.std(0))


def _one_pixel_example():
  """8 neurons with 4x4 maps; neuron 0's map gets one pixel of 5 under the trigger."""
  clean = np.ones((1, 4, 4, 8), np.float32) * np.linspace(1.0, 2.0, 8, dtype=np.float32)
  triggered = clean.copy()
  triggered[0, 2, 1, 0] = 5.0
  triggered[0, :, :, 3] += 0.1  # A small, spread shift on neuron 3.
  return clean, triggered


def test_summaries_match_hand_computation_on_one_pixel_example():
  clean, triggered = _one_pixel_example()
  clean_norms = norms.activation_norms(jnp.asarray(clean))[:, 0]
  delta = norms.activation_norms(jnp.asarray(triggered))[:, 0] - clean_norms
  # Neuron 0 (clean value 1 on 16 pixels): l1 16 -> 20, l2 4 -> sqrt(40), linf 1 -> 5.
  # Neuron 3 (value v on 16 pixels, + 0.1): l1 +1.6, l2 +0.4, linf +0.1.
  expected_delta = {
      "l1": (4.0, 1.6), "l2": (np.sqrt(40.0) - 4.0, 0.4), "linf": (4.0, 0.1)}
  clean_top = {"l1": 16.0, "l2": 4.0, "linf": 1.0}
  summarize = jax.jit(norms.summarize)
  for i, norm in enumerate(norms.NORMS):
    big, small = expected_delta[norm]
    full = np.zeros(8)
    full[0], full[3] = big, small
    np.testing.assert_allclose(delta[i], full, atol=1e-5)
    summary = summarize(delta[i], clean_norms[i])
    z = (big - full.mean()) / full.std()
    np.testing.assert_allclose(summary["z"], z, rtol=1e-5)
    np.testing.assert_allclose(summary["top1_share"], big / (big + small), rtol=1e-5)
    np.testing.assert_allclose(summary["rel"], big / clean_top[norm], rtol=1e-5)
  rel = {norm: float(summarize(delta[i], clean_norms[i])["rel"])
         for i, norm in enumerate(norms.NORMS)}
  assert rel["linf"] == pytest.approx(4.0) and rel["l1"] == pytest.approx(0.25)
  assert rel["linf"] > rel["l2"] > rel["l1"]


def test_summary_edge_cases():
  summarize = jax.jit(norms.summarize)
  flat = summarize(jnp.full(200, 0.5), jnp.ones(200))
  assert float(flat["z"]) == 0.0
  np.testing.assert_allclose(flat["top1_share"], 2 / 200)  # top 1 % of 200 neurons: 2
  negative = summarize(-jnp.arange(1.0, 6.0), jnp.ones(5))
  assert float(negative["top1_share"]) == 0.0
  # A neuron dead on clean data: the denominator is floored at 1 % of the mean clean norm.
  dead = summarize(jnp.array([3.0, 0.0, 0.0, 0.0]), jnp.array([0.0, 2.0, 2.0, 4.0]))
  np.testing.assert_allclose(dead["rel"], 3.0 / (norms.REL_FLOOR * 2.0), rtol=1e-5)
  assert np.isfinite(float(summarize(jnp.ones(4), jnp.zeros(4))["rel"]))


def test_layer_summary_per_norm_from_moments():
  clean, triggered = _one_pixel_example()
  values = np.stack([np.asarray(norms.activation_norms(jnp.asarray(a)))[:, 0]
                     for a in (clean, triggered)])
  moments = norms.Moments(1.0, values.astype(np.float64), np.zeros_like(values, np.float64))
  summary = norms.layer_summary(moments, 0)
  assert set(summary) == set(norms.NORMS)
  assert summary["linf"]["rel"] == pytest.approx(4.0)
  assert summary["l1"]["top1_share"] == pytest.approx(4.0 / 5.6)
