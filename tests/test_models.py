import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linfjax import models

TINY = {"cnn": 0.125, "preact_resnet18": 0.0625, "vgg11": 0.0625, "vgg16": 0.0625,
        "alexnet": 0.0625}


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_shapes_probe_and_split(name):
  model = models.create(name, num_classes=7, width=TINY[name])
  variables = models.init(model, jax.random.key(0), (32, 32, 3))
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  logits, activations = jax.jit(model.apply)(variables, x)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  layer = model.default_probe
  assert layer == models.layer_names(model)[-1]
  assert list(activations) == [layer]
  features, _ = model.apply(variables, x, stop=layer)
  np.testing.assert_array_equal(features, activations[layer])
  head_logits, _ = model.apply(variables, features, start=layer)
  np.testing.assert_allclose(head_logits, logits, rtol=1e-5, atol=1e-5)


def test_cnn_layers_and_probe_shapes():
  model = models.create("cnn", num_classes=10, probe_layers=("conv1_2", "conv3_2"))
  variables = models.init(model, jax.random.key(0), (32, 32, 3))
  _, activations = model.apply(variables, jnp.zeros((1, 32, 32, 3)))
  assert activations["conv1_2"].shape == (1, 32, 32, 32)
  assert activations["conv3_2"].shape == (1, 8, 8, 128)


def test_mask_zeroes_channel_and_changes_logits_as_hand_computed():
  model = models.create("cnn", num_classes=10, width=0.125)
  variables = models.init(model, jax.random.key(0), (32, 32, 3))
  x = jax.random.uniform(jax.random.key(2), (3, 32, 32, 3))
  layer = "conv3_2"
  _, clean_activations = model.apply(variables, x)
  k = clean_activations[layer].shape[-1]
  mask = jnp.ones(k).at[1].set(0.0).at[4].set(0.0)
  logits, activations = jax.jit(model.apply)(variables, x, {layer: mask})
  features = activations[layer]
  assert float(jnp.abs(features[..., 1]).max()) == 0.0
  assert float(jnp.abs(features[..., 4]).max()) == 0.0
  np.testing.assert_array_equal(features[..., 0], clean_activations[layer][..., 0])
  # Head by hand: global average pool, then the dense layer.
  head = variables["params"]["head"]
  pooled = np.asarray(clean_activations[layer]).mean(axis=(1, 2)) * np.asarray(mask)
  expected = pooled @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_mask_on_an_early_layer_propagates():
  model = models.create("cnn", num_classes=10, width=0.125)
  variables = models.init(model, jax.random.key(0), (32, 32, 3))
  x = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3))
  k = 4
  zero_all = {"conv1_1": jnp.zeros(k)}
  logits, _ = model.apply(variables, x, zero_all)
  logits_other, _ = model.apply(variables, x * 0.5, zero_all)
  # With every channel of the first layer zeroed, the output no longer depends on the input.
  np.testing.assert_allclose(logits, logits_other, atol=1e-6)


def test_start_applies_the_mask_of_the_start_layer():
  model = models.create("cnn", num_classes=10, width=0.125)
  variables = models.init(model, jax.random.key(0), (32, 32, 3))
  x = jax.random.uniform(jax.random.key(3), (2, 32, 32, 3))
  mask = {"conv2_2": jnp.zeros(8).at[0].set(1.0)}
  full, _ = model.apply(variables, x, mask)
  features, _ = model.apply(variables, x, stop="conv2_2")
  split, _ = model.apply(variables, features, mask, start="conv2_2")
  np.testing.assert_allclose(split, full, rtol=1e-5, atol=1e-5)


def test_unknown_names_list_the_known_ones():
  with pytest.raises(KeyError, match="known: cnn, preact_resnet18, vgg11"):
    models.create("resnet50", num_classes=10)
  model = models.create("cnn", num_classes=10, width=0.125)
  variables = models.init(model, jax.random.key(0), (32, 32, 3))
  with pytest.raises(KeyError, match="unknown layer 'fc7'.*conv1_1"):
    model.apply(variables, jnp.zeros((1, 32, 32, 3)), {"fc7": jnp.ones(3)})


def test_normalisation_is_the_input_layer():
  model = models.create("cnn", num_classes=10, width=0.125, mean=(0.5, 0.5, 0.5),
                        std=(0.25, 0.25, 0.25))
  variables = models.init(model, jax.random.key(0), (32, 32, 3))
  shifted = models.create("cnn", num_classes=10, width=0.125, mean=(0.0, 0.0, 0.0),
                          std=(1.0, 1.0, 1.0))
  x = jax.random.uniform(jax.random.key(4), (2, 32, 32, 3))
  a, _ = model.apply(variables, x)
  b, _ = shifted.apply(variables, (x - 0.5) / 0.25)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _conv(x, kernel, stride=1, padding=1):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _batch_norm(x, params, stats):
  """Flax's BatchNorm in evaluation mode (epsilon 1e-5), written out."""
  channel = lambda v: jnp.reshape(v, (1, 1, 1, -1))
  return ((x - channel(stats["mean"])) / jnp.sqrt(channel(stats["var"]) + 1e-5)
          * channel(params["scale"]) + channel(params["bias"]))


@pytest.mark.parametrize("block, projected", [("block1_1", False), ("block2_1", True)])
def test_preact_block_output_is_the_residual_sum(block, projected):
  """The probed activation of a pre-activation block is `conv(relu(bn(conv(relu(bn(x)))))) +
  shortcut`, with no ReLU after the add (docs/method.md, "Activation norms"), computed by hand."""
  model = models.create("preact_resnet18", num_classes=10, width=0.0625,
                        probe_layers=(block,))
  variables = models.init(model, jax.random.key(0), (32, 32, 3))
  # Non-trivial batch statistics, so that the normalisation is exercised.
  variables = {"params": variables["params"], "batch_stats": jax.tree.map(
      lambda leaf: leaf + 0.25 * jax.random.uniform(jax.random.key(1), leaf.shape),
      variables["batch_stats"])}
  x = jax.random.uniform(jax.random.key(5), (2, 32, 32, 3))
  previous = {"block1_1": "conv1", "block2_1": "block1_2"}[block]
  h, _ = model.apply(variables, x, stop=previous)
  params, stats = variables["params"][block], variables["batch_stats"][block]
  a = jax.nn.relu(_batch_norm(h, params["BatchNorm_0"], stats["BatchNorm_0"]))
  stride = 2 if projected else 1
  convs = ("Conv_1", "Conv_2") if projected else ("Conv_0", "Conv_1")
  out = _conv(a, params[convs[0]]["kernel"], stride)
  out = jax.nn.relu(_batch_norm(out, params["BatchNorm_1"], stats["BatchNorm_1"]))
  out = _conv(out, params[convs[1]]["kernel"])
  shortcut = _conv(a, params["Conv_0"]["kernel"], stride, 0) if projected else h
  expected = out + shortcut
  _, activations = model.apply(variables, x)
  np.testing.assert_allclose(activations[block], expected, rtol=1e-4, atol=1e-4)
  assert float(jnp.min(expected)) < 0.0, "a residual sum without a ReLU has negative values"


def test_preact_network_updates_batch_statistics_in_train_mode():
  model = models.create("preact_resnet18", num_classes=10, width=0.0625)
  variables = models.init(model, jax.random.key(0), (32, 32, 3))
  x = jax.random.uniform(jax.random.key(5), (4, 32, 32, 3))
  (logits, _), updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits.shape == (4, 10)
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(updates["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("head_pool, reference", [
    ("avg", lambda h: h.mean(axis=(1, 2))),
    ("max", lambda h: h.max(axis=(1, 2))),
    ("max2_avg", lambda h: h.reshape(h.shape[0], h.shape[1] // 2, 2, h.shape[2] // 2, 2,
                                     h.shape[3]).max(axis=(2, 4)).mean(axis=(1, 2))),
])
def test_head_pooling_against_numpy(head_pool, reference):
  model = models.create("cnn", num_classes=10, width=0.125, head_pool=head_pool)
  variables = models.init(model, jax.random.key(0), (32, 32, 3))
  x = jax.random.uniform(jax.random.key(6), (3, 32, 32, 3))
  logits, activations = jax.jit(model.apply)(variables, x)
  features = np.asarray(activations["conv3_2"], np.float64)
  dense = variables["params"]["head"]
  expected = reference(features) @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])[None]
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_vgg16_and_alexnet_layers_and_probe_shapes():
  vgg = models.create("vgg16", num_classes=43, width=0.0625, probe_layers=("conv2", "conv13"))
  variables = models.init(vgg, jax.random.key(0), (32, 32, 3))
  _, activations = vgg.apply(variables, jnp.zeros((1, 32, 32, 3)))
  assert len(models.layer_names(vgg)) == 13 and vgg.default_probe == "conv13"
  assert activations["conv2"].shape == (1, 32, 32, 4) and activations["conv13"].shape == (1, 2, 2, 32)
  alex = models.create("alexnet", num_classes=43, width=0.0625, probe_layers=("conv1", "conv5"))
  variables = models.init(alex, jax.random.key(0), (32, 32, 3))
  _, activations = alex.apply(variables, jnp.zeros((1, 32, 32, 3)))
  assert models.layer_names(alex) == ("conv1", "conv2", "conv3", "conv4", "conv5")
  assert activations["conv1"].shape == (1, 32, 32, 4) and activations["conv5"].shape == (1, 8, 8, 16)
  assert variables["params"]["fc6"]["kernel"].shape == (4 * 4 * 16, 256)


def test_alexnet_mask_and_classifier_as_hand_computed():
  model = models.create("alexnet", num_classes=5, width=0.0625)
  variables = models.init(model, jax.random.key(1), (32, 32, 3))
  x = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3))
  _, clean = model.apply(variables, x)
  mask = jnp.ones(16).at[3].set(0.0)
  logits, masked = jax.jit(model.apply)(variables, x, {"conv5": mask})
  features = np.asarray(clean["conv5"]) * np.asarray(mask)
  np.testing.assert_array_equal(masked["conv5"], features)
  # Classifier by hand: 3x3 stride-2 max-pool (SAME, 8 -> 4), flatten, fc6, fc7, head.
  padded = np.pad(features, ((0, 0), (0, 1), (0, 1), (0, 0)), constant_values=-np.inf)
  pooled = np.stack([np.stack([padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
                               for j in range(4)], 1) for i in range(4)], 1)
  params = jax.tree.map(np.asarray, variables["params"])
  hidden = np.maximum(pooled.reshape(2, -1) @ params["fc6"]["kernel"] + params["fc6"]["bias"], 0)
  hidden = np.maximum(hidden @ params["fc7"]["kernel"] + params["fc7"]["bias"], 0)
  expected = hidden @ params["head"]["kernel"] + params["head"]["bias"]
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
  split, _ = model.apply(variables, masked["conv5"], start="conv5")
  np.testing.assert_allclose(split, logits, rtol=1e-5, atol=1e-5)
