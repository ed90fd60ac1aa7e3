"""Grad-CAM against a hand-derived answer, finite differences and NumPy bilinear resizing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from linfjax.detection import gradcam
from linfjax import attacks

K = 3


def _features(variables, images, stride=1, shift=0.0):
  """[B, H, W, C] -> [B, H / s, W / s, K]: average-pool by `stride`, 1x1 projection, ReLU."""
  b, h, w, c = images.shape
  pooled = images.reshape(b, h // stride, stride, w // stride, stride, c).mean(axis=(2, 4))
  return jax.nn.relu(jnp.einsum("bhwc,ck->bhwk", pooled, variables["project"]) - shift)


def _gap_linear_apply(variables, x, *, start=None, stop=None, stride=1, shift=0.0):
  """A model whose head is linear on globally averaged features: alpha_k = W[k, c] / (H'W')."""
  features = x if start == "features" else _features(variables, x, stride, shift)
  if stop == "features":
    return features, {}
  return jnp.mean(features, axis=(1, 2)) @ variables["head"] + variables["bias"][None], {}


def _tanh_head_apply(variables, x, *, start=None, stop=None):
  """A head whose gradient varies with position: logit_c = sum V[h, w, k, c] tanh(A[h, w, k])."""
  features = x if start == "features" else _features(variables, x)
  if stop == "features":
    return features, {}
  return jnp.einsum("bhwk,hwkc->bc", jnp.tanh(features), variables["head"]), {}


def _variables(head_shape=(K, 4)):
  keys = jax.random.split(jax.random.key(0), 3)
  return {"project": jax.random.normal(keys[0], (3, K)),
          "head": jax.random.normal(keys[1], head_shape),
          "bias": jax.random.normal(keys[2], (head_shape[-1],))}


def _images(n, size):
  return jax.random.uniform(jax.random.key(5), (n, size, size, 3))


def _normalised(cam):
  peak = cam.max(axis=(1, 2), keepdims=True)
  return cam / np.where(peak > 0, peak, 1.0)


def _compiled(apply_fn):
  """Jitted Grad-CAM at the 'features' layer: (variables, images, classes) -> maps."""
  return jax.jit(functools.partial(gradcam.gradcam, apply_fn=apply_fn, layer="features"))


def test_gap_linear_head_gives_hand_derived_map():
  variables = _variables()
  images = _images(4, 8)
  classes = jnp.array([0, 1, 2, 3])
  maps = _compiled(_gap_linear_apply)(variables, images, classes)
  features = np.asarray(_features(variables, images))
  alpha = np.asarray(variables["head"])[:, np.asarray(classes)].T / (8 * 8)  # [B, K]
  expected = _normalised(np.maximum(np.einsum("bhwk,bk->bhw", features, alpha), 0.0))
  assert maps.shape == (4, 8, 8)
  np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6)
  # Image 0's class-0 evidence is negative everywhere: its map is empty and stays zero.
  np.testing.assert_allclose(np.asarray(maps).max(axis=(1, 2)), [0.0, 1.0, 1.0, 1.0], rtol=1e-6)


def test_gradient_weights_match_finite_differences():
  variables = _variables(head_shape=(8, 8, K, 4))
  images = _images(2, 8)
  classes = jnp.array([2, 0])
  maps = _compiled(_tanh_head_apply)(variables, images, classes)
  features = np.asarray(_features(variables, images), np.float64)
  eps = 1e-2
  logit = lambda a, b: float(_tanh_head_apply(variables, jnp.asarray(a[None], jnp.float32),
                                              start="features")[0][0, int(classes[b])])
  for b in range(2):
    alpha = np.zeros(K)
    for k in range(K):
      step = np.zeros_like(features[b])
      step[..., k] = eps
      # Moving every pixel of A_k by eps: the derivative is sum_{h,w} d logit / d A_k[h, w].
      alpha[k] = (logit(features[b] + step, b) - logit(features[b] - step, b)) / (2 * eps * 64)
    expected = _normalised(np.maximum(np.einsum("hwk,k->hw", features[b], alpha), 0.0)[None])
    np.testing.assert_allclose(maps[b], expected[0], rtol=2e-3, atol=2e-3)


def _bilinear_matrix(size_in, size_out):
  """Half-pixel-centre bilinear interpolation with clamped edges, as a [out, in] matrix."""
  centres = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
  low = np.floor(centres).astype(int)
  high = np.minimum(low + 1, size_in - 1)
  weight = centres - low
  matrix = np.zeros((size_out, size_in))
  np.add.at(matrix, (np.arange(size_out), low), 1 - weight)
  np.add.at(matrix, (np.arange(size_out), high), weight)
  return matrix


def test_coarse_map_is_resized_bilinearly_and_scaled():
  variables = _variables()
  images = _images(3, 16)
  classes = jnp.array([1, 1, 3])
  maps = _compiled(functools.partial(_gap_linear_apply, stride=4))(variables, images, classes)
  features = np.asarray(_features(variables, images, stride=4))
  alpha = np.asarray(variables["head"])[:, np.asarray(classes)].T / 16
  cam = np.maximum(np.einsum("bhwk,bk->bhw", features, alpha), 0.0)
  resize = _bilinear_matrix(4, 16)
  expected = _normalised(np.einsum("ih,bhw,jw->bij", resize, cam, resize))
  assert maps.shape == (3, 16, 16)
  np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-5)


def test_all_zero_map_stays_zero():
  apply_fn = functools.partial(_gap_linear_apply, stride=2, shift=100.0)  # ReLU kills all.
  maps = _compiled(apply_fn)(_variables(), _images(2, 8), jnp.array([0, 1]))
  assert np.all(np.isfinite(maps)) and float(np.abs(maps).max()) == 0.0


def test_batched_gradcam_pads_and_matches_one_batch():
  variables = _variables()
  images = np.asarray(_images(5, 8))
  classes = np.array([0, 1, 2, 3, 0])
  apply_fn = functools.partial(_gap_linear_apply, stride=2)
  whole = gradcam.gradcam(variables, images, classes, apply_fn=apply_fn, layer="features")
  batched = gradcam.batched_gradcam(apply_fn, variables, images, classes, layer="features",
                                    batch_size=2)
  np.testing.assert_allclose(batched, whole, rtol=1e-6, atol=1e-7)


def test_attention_share_inside_region():
  region = np.zeros((4, 4), bool)
  region[2:, 2:] = True
  maps = np.zeros((3, 4, 4), np.float32)
  maps[0, 3, 3], maps[0, 0, 0] = 3.0, 1.0  # 3 of 4 units of mass inside
  maps[1] = 0.5  # uniform: 4 of 16 pixels inside
  share = jax.jit(gradcam.attention)(maps, region)
  np.testing.assert_allclose(share, [0.75, 0.25, 0.0], rtol=1e-6)
  patch = attacks.patch((4, 4, 3), size=2, row=2, col=2, pattern=np.ones(3))
  np.testing.assert_array_equal(attacks.region(patch), region)
  blend = attacks.blend((4, 4, 3), alpha=0.2, pattern=np.zeros((4, 4, 3)))
  np.testing.assert_allclose(gradcam.attention(maps[:2], attacks.region(blend)), [1.0, 1.0])
