"""CLP: conv/batch-norm pairs as the references walk modules, the channel bound by hand, the
pruning rule."""

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


def _torch_walk_pairs(forward_order: bool):
  """Each batch norm of PreActResNet-18 with the last conv before it in a walk over the
  modules: BackdoorBench's PreActBlock declares bn1, conv1, bn2, conv2, shortcut (what
  `named_modules()` yields); its forward runs bn1, shortcut, conv1, bn2, conv2. Flax names:
  a downsampling block's shortcut is Conv_0 (called first), its 3x3 convs Conv_1, Conv_2."""
  walk = ["conv1/Conv_0"]
  for stage in (1, 2, 3, 4):
    for block in (1, 2):
      name, projection = f"block{stage}_{block}", stage > 1 and block == 1
      first, second = (f"{name}/Conv_1", f"{name}/Conv_2") if projection else (
          f"{name}/Conv_0", f"{name}/Conv_1")
      shortcut = [f"{name}/Conv_0"] if projection else []
      norms = [f"{name}/BatchNorm_0", f"{name}/BatchNorm_1"]
      if forward_order:
        walk += [norms[0], *shortcut, first, norms[1], second]
      else:
        walk += [norms[0], first, norms[1], second, *shortcut]
  pairs, conv = {}, None
  for module in walk:
    if "Conv" in module:
      conv = module
    else:
      pairs[module] = conv
  return pairs


def test_clp_pairs_every_batch_norm_with_the_last_conv_as_clp_py():
  """defense.py's CLP and BackdoorBench's defense/clp.py CLP_prune pair every BatchNorm2d
  with the last Conv2d before it in `named_modules()`: 16 norms on PreActResNet-18."""
  model, variables = _tiny("cnn")
  for pairing in clp.PAIRINGS:
    pairs = clp.conv_bn_pairs(model, variables, (16, 16, 3), pairing=pairing)
    assert pairs == tuple((f"{layer}/Conv_0", f"{layer}/BatchNorm_0") for layer in
                          ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2"))
  model, variables = _shapes("preact_resnet18", 0.0625)
  declared = clp.conv_bn_pairs(model, variables, (16, 16, 3))
  assert len(declared) == 16 == len(bn.layer_names(variables))
  assert dict((norm, conv) for conv, norm in declared) == _torch_walk_pairs(False)
  traced = dict((norm, conv) for conv, norm in
                clp.conv_bn_pairs(model, variables, (16, 16, 3), pairing="traced"))
  assert traced == _torch_walk_pairs(True)
  # A block's first norm takes the previous block's last conv: after a downsampling block,
  # its shortcut as declared, its second 3x3 conv as run.
  assert dict((norm, conv) for conv, norm in declared)["block2_2/BatchNorm_0"] == \
      "block2_1/Conv_0"
  assert traced["block2_2/BatchNorm_0"] == "block2_1/Conv_2"
  assert traced["block1_2/BatchNorm_0"] == "block1_1/Conv_1"
  assert sum(traced[n] != c for c, n in declared) == 3
  model, variables = _shapes("alexnet", 0.0625)
  assert len(clp.conv_bn_pairs(model, variables, (16, 16, 3))) == 5


def test_bound_of_a_first_norm_uses_the_shortcut_kernel():
  """block2_2's first norm, paired with block2_1's 1x1 shortcut: the bound of a 1x1 kernel
  is the l2 norm of its C_in weights, times |gamma| / sqrt(var)."""
  model, variables = _tiny("preact_resnet18", 0.0625)
  params = jax.tree.map(np.asarray, variables["params"])
  stats = jax.tree.map(np.asarray, variables["batch_stats"])
  rng = np.random.default_rng(0)
  size = params["block2_2"]["BatchNorm_0"]["scale"].shape
  params["block2_2"]["BatchNorm_0"]["scale"] = rng.normal(size=size).astype(np.float32)
  stats["block2_2"]["BatchNorm_0"]["var"] = rng.uniform(0.5, 2.0, size).astype(np.float32)
  variables = {"params": params, "batch_stats": stats}
  bounds = clp.channel_lipschitz(variables, clp.conv_bn_pairs(model, variables, (16, 16, 3)))
  kernel = np.asarray(variables["params"]["block2_1"]["Conv_0"]["kernel"], np.float64)
  assert kernel.shape[:2] == (1, 1)
  gain = (np.abs(np.asarray(bn.scale(variables, "block2_2/BatchNorm_0"), np.float64))
          / np.sqrt(np.asarray(bn.running_var(variables, "block2_2/BatchNorm_0"), np.float64)))
  np.testing.assert_allclose(bounds["block2_2/BatchNorm_0"],
                             np.linalg.norm(kernel[0, 0], axis=0) * gain, rtol=1e-6)
  assert len(bounds) == 16


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
