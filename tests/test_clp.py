"""CLP: conv/batch-norm pairs by data flow, the channel bound by hand, the pruning rule."""

import jax
import numpy as np

from linfjax import models
from linfjax.defenses import bn, clp


def _tiny(name, width=0.125):
  model = models.create(name, num_classes=4, width=width)
  return model, models.init(model, jax.random.key(0), (16, 16, 3))


def _shapes(name, width):
  """Abstract variables: pairing needs only a trace."""
  model = models.create(name, num_classes=4, width=width)
  return model, jax.eval_shape(lambda: models.init(model, jax.random.key(0), (16, 16, 3)))


def test_pairs_follow_the_data_flow():
  model, variables = _tiny("cnn")
  pairs = clp.conv_bn_pairs(model, variables, (16, 16, 3))
  assert pairs == tuple((f"{layer}/Conv_0", f"{layer}/BatchNorm_0") for layer in
                        ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2"))
  model, variables = _shapes("preact_resnet18", 0.0625)
  pairs = dict((norm, conv) for conv, norm in clp.conv_bn_pairs(model, variables, (16, 16, 3)))
  # The stem conv feeds the first block's first norm; later first norms take residual sums.
  assert pairs["block1_1/BatchNorm_0"] == "conv1/Conv_0"
  assert "block1_2/BatchNorm_0" not in pairs and "block3_1/BatchNorm_0" not in pairs
  # Inner norms follow the 3x3 conv, created after the 1x1 shortcut in downsampling blocks.
  assert pairs["block1_1/BatchNorm_1"] == "block1_1/Conv_0"
  assert pairs["block2_1/BatchNorm_1"] == "block2_1/Conv_1"
  assert len(pairs) == 9
  model, variables = _shapes("alexnet", 0.0625)
  assert len(clp.conv_bn_pairs(model, variables, (16, 16, 3))) == 5


def test_channel_bound_matches_a_hand_computation():
  model, variables = _tiny("cnn")
  layer = "conv3_2"
  kernel = np.zeros((3, 3, 16, 16), np.float32)
  spatial = np.zeros(9)
  spatial[[0, 4]] = [3.0, 4.0]  # norm 5
  channel_in = np.zeros(16)
  channel_in[[2, 7]] = [0.6, 0.8]  # norm 1
  for k in range(16):
    # Rank one: W_k = (k + 1) * spatial (x) channel_in, largest singular value 5 (k + 1).
    kernel[..., k] = (k + 1) * np.outer(spatial, channel_in).reshape(3, 3, 16)
  gamma = np.linspace(-2.0, 2.0, 16).astype(np.float32)
  var = np.linspace(0.25, 4.0, 16).astype(np.float32)
  params = jax.tree.map(np.asarray, variables["params"])
  params[layer]["Conv_0"]["kernel"] = kernel
  params[layer]["BatchNorm_0"]["scale"] = gamma
  stats = jax.tree.map(np.asarray, variables["batch_stats"])
  stats[layer]["BatchNorm_0"]["var"] = var
  variables = {"params": params, "batch_stats": stats}
  bounds = clp.channel_lipschitz(variables, clp.conv_bn_pairs(model, variables, (16, 16, 3)))
  expected = 5.0 * (np.arange(16) + 1) * np.abs(gamma) / np.sqrt(var)
  np.testing.assert_allclose(bounds[f"{layer}/BatchNorm_0"], expected, rtol=1e-5)


def test_pruning_rule_and_its_effect_equal_a_layer_mask():
  bounds = {"x": np.array([1.0, 1.0, 1.0, 1.0, 10.0]), "y": np.array([2.0, 2.0])}
  # mean 2.8, sample std 4.025: 1 std above is 6.82, 3 std above is 14.9.
  np.testing.assert_array_equal(clp.keep_within(bounds, 1.0)["x"], [1, 1, 1, 1, 0])
  np.testing.assert_array_equal(clp.keep_within(bounds, 3.0)["x"], [1, 1, 1, 1, 1])
  np.testing.assert_array_equal(clp.keep_within(bounds)["y"], [1, 1])

  model, variables = _tiny("cnn")
  keep = {name: np.ones(size, np.float32) for name, size in bn.sizes(variables).items()}
  keep["conv2_2/BatchNorm_0"][[0, 5]] = 0.0
  pruned = clp.pruned_variables(variables, keep)
  for read in (bn.scale, bn.bias):
    np.testing.assert_array_equal(np.asarray(read(pruned, "conv2_2/BatchNorm_0"))[[0, 5]], 0.0)
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
  # After a ConvBN, zero scale and bias give ReLU(0) = 0: the same as masking the layer.
  logits, _ = model.apply(pruned, x)
  masked, _ = model.apply(variables, x, {"conv2_2": keep["conv2_2/BatchNorm_0"]})
  np.testing.assert_allclose(logits, masked, rtol=1e-5, atol=1e-6)
  _, chosen, _ = clp.defend(model, variables, (16, 16, 3), u=3.0)
  assert set(chosen) == {f"{layer}/BatchNorm_0" for layer in models.layer_names(model)}
