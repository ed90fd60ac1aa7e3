"""Pruning as a mask transform: masks, the one-call sweep, r*, DER, Fine-Pruning, fine-tuning,
and the prune stage (results contract, files, skip of the synthetic trigger, resume)."""

import csv
import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_pipeline import tiny_config

from linfjax import attacks, keys, models
from linfjax import config as config_lib
from linfjax.defenses import anp, clp, multi_layer
from linfjax.defenses import nc_unlearning as unlearning
from linfjax.defenses import pruning as prune
from linfjax.detection import norms
from linfjax.runs import pipeline
from linfjax.runs.stages import prune as prune_stage
from linfjax.runs.stages import train as train_stage
from linfjax.training import finetune, metrics

METHODS = ("linf", "l2", "l1", "linf_ft", "l2_ft", "l1_ft", "linf_layers", "linf_layers_ft",
           "fine_pruning", "fine_tuning")
ENTRY_KEYS = {"r_star", "CA", "ASR_real", "ASR_defender", "dCA", "dASR", "DER"}


@functools.lru_cache(maxsize=None)
def _small_cnn():
  model = models.create("cnn", num_classes=10, width=0.25, probe_layers=("conv2_2", "conv3_2"))
  return model, models.init(model, jax.random.key(0), (32, 32, 3))


def _patch():
  return attacks.patch((32, 32, 3), size=3, row=29, col=29, pattern=np.ones((3, 3, 3)))


def test_level_counts_from_fractions_and_counts():
  np.testing.assert_array_equal(
      prune.level_counts([0.25, 0.5, 0.9, 0.05], 10, unit="fraction"), [0, 1, 3, 5, 9])
  np.testing.assert_array_equal(prune.level_counts([3, 3, 10], 10, unit="count"), [0, 3, 10])
  grid = (0.0, 0.01, 0.02, 0.03, 0.1, 0.5, 0.9)
  np.testing.assert_array_equal(prune.level_counts(grid, 128, unit="fraction"),
                                [0, 1, 3, 4, 13, 64, 115])
  with pytest.raises(ValueError, match=r"\[0, 10\]"):
    prune.level_counts([11], 10, unit="count")
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    prune.level_counts([1.0], 10, unit="fraction")


@pytest.mark.parametrize("field, value, message", [
    ("defenses", ("linf", "l3"), "config.prune.defenses: must be distinct names from linf, "),
    ("real_defenses", ("l1", "l1"), "config.prune.real_defenses"),
    ("levels", (0.5, 1.0), "config.prune.levels: 1.0 is not a fraction"),
    ("layer", "conv9", "config.prune.layer: unknown layer 'conv9' of model 'cnn'"),
    ("score", "max", "config.prune.score: unknown value 'max'"),
    ("tau", 101.0, "config.prune.tau: 101.0 is outside [0.0, 100.0]"),
    ("fine_tune.epochs", 0, "config.prune.fine_tune.epochs: must be an integer >= 1"),
    ("anp.iterations", 0, "config.prune.anp.iterations: must be an integer >= 1"),
    ("nc_unlearning.share", 0.0, "config.prune.nc_unlearning.share: 0.0 is outside (0.0, 1.0]"),
    ("layers.levels", (0.2, 0.1), "config.prune.layers.levels: must be distinct increasing"),
    ("fine_pruning.level", "auto", "config.prune.fine_pruning.level: unknown value 'auto'"),
    ("fine_pruning.score", "max", "config.prune.fine_pruning.score: unknown value 'max'"),
    ("fine_pruning.ratio", 0.0, "config.prune.fine_pruning.ratio: 0.0 is outside (0.0, 1.0]"),
    ("fine_pruning.grid", "fine", "config.prune.fine_pruning.grid: unknown value 'fine'"),
    ("anp.clip_noise", None, "config.prune.anp.clip_noise: must be True or False"),
    ("anp.learning_rate", 0.0, "config.prune.anp.learning_rate: 0.0 is outside (0.0, 10.0]"),
    ("anp.pruning_by", "ratio", "config.prune.anp.pruning_by: unknown value 'ratio'"),
    ("anp.selection", "best", "config.prune.anp.selection: unknown value 'best'"),
    ("anp.acc_ratio", 1.5, "config.prune.anp.acc_ratio: 1.5 is outside (0.0, 1.0]"),
    ("clp.pairing", "named", "config.prune.clp.pairing: unknown value 'named'"),
    ("nc_unlearning.only_flagged", None,
     "config.prune.nc_unlearning.only_flagged: must be True or False"),
    ("nad.beta", -1.0, "config.prune.nad.beta: -1.0 is outside [0.0, 1000000.0]"),
    ("nad.power", 0.0, "config.prune.nad.power: 0.0 is outside (0.0, 16.0]"),
    ("ft_sam.rho", 0.0, "config.prune.ft_sam.rho: 0.0 is outside (0.0, 10.0]"),
    ("rnp.clean_threshold", 1.5, "config.prune.rnp.clean_threshold: 1.5 is outside [0.0, 1.0]"),
    ("rnp.recovering_epochs", 0, "config.prune.rnp.recovering_epochs: must be an integer >= 1"),
    ("rnp.pruning_by", "ratio", "config.prune.rnp.pruning_by: unknown value 'ratio'"),
    ("sau.eps", 0.0, "config.prune.sau.eps: 0.0 is outside (0.0, 1.0]"),
    ("sau.steps", 0, "config.prune.sau.steps: must be an integer >= 1, got 0"),
    ("ibau.rounds", 0, "config.prune.ibau.rounds: must be an integer >= 1"),
    ("ibau.learning_rate", 0.0, "config.prune.ibau.learning_rate: 0.0 is outside (0.0, 1.0]"),
    ("ibau.portion", 0.001, "config.prune.ibau.portion: 0.001 of a batch of 256 perturbs no "
     "image; raise it or the batch size"),
])
def test_prune_config_errors_name_the_field(field, value, message):
  config = config_lib.make_quick(config_lib.base_config())
  block, _, name = ("prune." + field).rpartition(".")
  node = config
  for part in block.split("."):
    node = node[part]
  default = node[name]
  node[name] = value
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    config_lib.validate(config)
  node[name] = default
  config.prune.update(level_unit="count", levels=(0, 2.5))
  with pytest.raises(config_lib.ConfigError, match=r"config.prune.levels: 2.5 is not a neuron"):
    config_lib.validate(config)


def test_masks_zero_exactly_the_chosen_channels():
  order = np.array([3, 0, 7, 1, 2, 6, 5, 4])
  stack = prune.masks(order, [0, 2, 5, 8])
  assert stack.shape == (4, 8) and stack.dtype == np.float32
  np.testing.assert_array_equal(stack[0], np.ones(8))
  np.testing.assert_array_equal(np.flatnonzero(stack[1] == 0), [0, 3])
  np.testing.assert_array_equal(np.flatnonzero(stack[2] == 0), [0, 1, 2, 3, 7])
  np.testing.assert_array_equal(stack[3], np.zeros(8))
  assert set(np.unique(stack)) == {0.0, 1.0}

  model, variables = _small_cnn()
  x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
  order = prune.ranking(np.arange(32.0))  # Largest first: 31, 30, ...
  mask = prune.masks(order, [5])[0]
  forward = jax.jit(lambda v, x, m: model.apply(v, x, m)[1]["conv3_2"])
  masked = np.asarray(forward(variables, x, {"conv3_2": mask}))
  full = np.asarray(forward(variables, x, {"conv3_2": np.ones(32, np.float32)}))
  assert np.all(masked[..., 27:] == 0.0) and np.any(full[..., 27:] > 0)
  np.testing.assert_array_equal(masked[..., :27], full[..., :27])


@pytest.mark.parametrize("layer", ["conv3_2", "conv2_2"])
def test_vmapped_sweep_equals_one_full_pass_per_level(layer):
  model, variables = _small_cnn()
  num_neurons = {"conv3_2": 32, "conv2_2": 16}[layer]
  images = np.asarray(jax.random.randint(jax.random.key(2), (24, 32, 32, 3), 0, 256), np.uint8)
  labels = np.asarray(jax.random.randint(jax.random.key(3), (24,), 0, 10), np.int32)
  trigger = _patch()
  order = np.asarray(jax.random.permutation(jax.random.key(4), num_neurons))
  stack = prune.masks(order, prune.level_counts([0.1, 0.3, 0.6, 0.9], num_neurons,
                                                unit="fraction"))
  # Five masks in chunks of two: two vmapped chunks and a remainder, in one call.
  swept = jax.jit(prune.masked_logits, static_argnames=("apply_fn", "start", "mask_batch"))(
      variables, jnp.asarray(images), (trigger,), {layer: jnp.asarray(stack)},
      apply_fn=model.apply, start=layer, mask_batch=2)
  assert swept.shape == (5, 2, 24, 10)
  full = jax.jit(lambda v, x, m: model.apply(v, x, {layer: m})[0])
  x = images.astype(np.float32) / 255.0
  triggered = attacks.apply(trigger, x)
  reference = np.stack([np.stack([full(variables, x, m), full(variables, triggered, m)])
                        for m in stack])
  np.testing.assert_allclose(swept, reference, rtol=1e-4, atol=1e-5)
  assert np.abs(reference[0] - reference[-1]).max() > 1e-3, "the masks change the logits"

  result = prune.sweep(model.apply, variables, images, labels, trigger, {layer: stack},
                       start=layer, target=0, mode="all_to_one", num_classes=10, batch_size=10,
                       mask_batch=8)
  for i in range(len(stack)):
    expected = metrics.attack_metrics(reference[i, 0].argmax(-1), reference[i, 1].argmax(-1),
                                      labels, target=0, mode="all_to_one", num_classes=10)
    assert {key: result[key][i] for key in ("CA", "ASR", "RA")} == pytest.approx(expected)


@pytest.mark.parametrize("asr, ca, expected", [
    ([90, 30, 3, 1], [80, 79.5, 78, 77.5], 2),  # First level under tau within the drop.
    ([90, 40, 4, 2], [80, 79, 76, 70], 1),  # 4 and 2 pass tau but drop 4 and 10 points.
    ([90, 60, 50, 55], [80, 80, 79, 78], 2),  # None reaches tau: lowest ASR within the drop.
    ([90, 50, 50, 80], [80, 80, 80, 80], 1),  # Ties: the smaller level.
    ([90, 1, 1], [80, 60, 50], 0),  # Only level 0 keeps the drop.
])
def test_r_star_on_hand_made_curves(asr, ca, expected):
  assert prune.choose_level(asr, ca, ca_reference=ca[0], tau=5.0, delta=3.0) == expected


def test_masks_on_several_layers_equal_one_full_pass_per_model():
  model, variables = _small_cnn()
  images = jax.random.uniform(jax.random.key(10), (6, 32, 32, 3))
  trigger = _patch()
  stacks = {"conv2_2": prune.masks(np.arange(16), [0, 4, 8]),
            "conv3_2": prune.masks(np.arange(32)[::-1], [0, 16, 2])}
  swept = prune.masked_logits(variables, images, (trigger,), stacks, apply_fn=model.apply,
                              start="conv2_2", mask_batch=1)
  full = jax.jit(lambda v, x, m: model.apply(v, x, m)[0])
  for i in range(3):
    mask_dict = {layer: stack[i] for layer, stack in stacks.items()}
    np.testing.assert_allclose(swept[i, 0], full(variables, images, mask_dict), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(swept[i, 1], full(variables, attacks.apply(trigger, images),
                                                 mask_dict), rtol=1e-4, atol=1e-5)
  with pytest.raises(KeyError, match="start layer 'conv1_1' has no masks"):
    prune.masked_logits(variables, images, (), stacks, apply_fn=model.apply, start="conv1_1")


def test_multi_layer_masks_per_layer_and_joint():
  scores = {"a": np.array([0.1, 5.0, 0.3, 2.0]), "b": np.array([1.0, 0.0, 4.0, 3.0, 0.5, 6.0,
                                                                0.2, 0.4])}
  pruned, stacks = multi_layer.multi_layer_masks(scores, [0.0, 0.25, 0.5], scope="per_layer")
  np.testing.assert_array_equal(pruned, [0, 3, 6])  # 25 %: 1 of a, 2 of b; 50 %: 2 and 4.
  np.testing.assert_array_equal(np.flatnonzero(stacks["a"][1] == 0), [1])
  np.testing.assert_array_equal(np.flatnonzero(stacks["b"][1] == 0), [2, 5])
  np.testing.assert_array_equal(np.flatnonzero(stacks["b"][2] == 0), [0, 2, 3, 5])
  pruned, stacks = multi_layer.multi_layer_masks(scores, [0.0, 0.25, 0.5], scope="joint")
  np.testing.assert_array_equal(pruned, [0, 3, 6])  # Of 12 neurons: the top 3, then 6.
  np.testing.assert_array_equal(np.flatnonzero(stacks["a"][1] == 0), [1])  # 5.0
  np.testing.assert_array_equal(np.flatnonzero(stacks["b"][1] == 0), [2, 5])  # 6.0, 4.0
  np.testing.assert_array_equal(np.flatnonzero(stacks["a"][2] == 0), [1, 3])  # + 2.0
  np.testing.assert_array_equal(np.flatnonzero(stacks["b"][2] == 0), [0, 2, 3, 5])  # + 3, 1
  with pytest.raises(ValueError, match="unknown multi-layer ranking"):
    multi_layer.multi_layer_masks(scores, [0.1], scope="both")


def test_relative_shift_divides_by_the_clean_norm_with_a_floor():
  mean = np.zeros((2, 3, 4))
  mean[0, 2] = [1.0, 2.0, 0.0, 4.0]  # Clean linf norms; neuron 2 is silent.
  mean[1, 2] = [2.0, 3.0, 1.0, 4.0]
  moments = norms.Moments(10.0, mean, np.zeros_like(mean))
  floor = 0.01 * np.mean([1.0, 2.0, 0.0, 4.0])
  np.testing.assert_allclose(multi_layer.relative_shifts(moments, norm="linf"),
                             [1.0, 0.5, 1.0 / floor, 0.0])


def test_defense_entry_der_matches_metrics_der():
  entry = prune_stage.defense_entry(r_star=12, ca=88.0, asr_real=1.0, asr_defender=0.5,
                              ca_before=90.0, asr_before=99.0)
  assert entry == {"r_star": 12, "CA": 88.0, "ASR_real": 1.0, "ASR_defender": 0.5,
                   "dCA": 2.0, "dASR": 98.0, "DER": 98.0}
  assert entry["DER"] == metrics.der(ca_before=90.0, ca_after=88.0, asr_before=99.0,
                                     asr_after=1.0)
  better = prune_stage.defense_entry(r_star=3, ca=91.0, asr_real=60.0, asr_defender=4.0,
                               ca_before=90.0, asr_before=99.0)
  assert better["dCA"] == -1.0 and better["DER"] == pytest.approx((39.0 + 100.0) / 2)


def _read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


SINGLE_LAYER = ("linf", "l2", "l1", "fine_pruning")


def test_prune_stage_results_files_skip_and_resume(cifar_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  config = tiny_config(cifar_dir)
  config.stages = ("train", "reverse", "prune")
  ctx = pipeline.make_context(config, workdir, progress=False)
  model = ctx.model()
  variables = models.init(model, jax.random.key(9), ctx.dataset.image_shape)
  monkeypatch.setattr(train_stage, "load_trained", lambda ctx, kind: (model, variables))
  before = metrics.evaluate(model.apply, variables, ctx.dataset.test_images,
                            ctx.dataset.test_labels, ctx.trigger, target=0, mode="all_to_one",
                            num_classes=10, batch_size=32)

  skipped = prune_stage.run(ctx)
  assert skipped["synthetic"] == {"skipped": prune_stage.NO_SYNTHETIC_TRIGGER}
  assert set(skipped["real"]) == set(SINGLE_LAYER)

  mask = np.zeros((32, 32, 1), np.float32)
  mask[-4:, -4:] = 1.0
  os.makedirs(os.path.join(workdir, "reverse"), exist_ok=True)
  np.savez(os.path.join(workdir, "reverse", "synthetic_trigger.npz"), mask=mask,
           pattern=np.ones((32, 32, 3), np.float32), target=np.int64(3), flagged=False)
  result = prune_stage.run(ctx)
  assert set(result) == {"synthetic", "real"}
  assert result["real"] == skipped["real"]
  stage_dir = os.path.join(workdir, "prune")
  layers = models.layer_names(model)
  for source, methods in (("synthetic", METHODS), ("real", SINGLE_LAYER)):
    assert set(result[source]) == set(methods)
    rows = _read_csv(os.path.join(stage_dir, f"sweep_{source}.csv"))
    # conv3_2 of the width-0.125 CNN has 16 neurons; the default grid gives 15 counts, and
    # the multi-layer sweep (synthetic trigger only) has 16 levels.
    assert len(rows) == 4 * 15 + (16 if source == "synthetic" else 0)
    for method in methods:
      entry = result[source][method]
      assert set(entry) == ENTRY_KEYS
      assert entry["DER"] == pytest.approx(metrics.der(
          ca_before=before["CA"], ca_after=entry["CA"], asr_before=before["ASR"],
          asr_after=entry["ASR_real"]), abs=1e-3)
    for method in SINGLE_LAYER + (("linf_layers",) if source == "synthetic" else ()):
      method_rows = [r for r in rows if r["method"] == method]
      chosen = [r for r in method_rows if r["r_star"] == "1"]
      assert len(chosen) == 1 and int(chosen[0]["r"]) == result[source][method]["r_star"]
    for method in SINGLE_LAYER:
      method_rows = [r for r in rows if r["method"] == method]
      assert [int(r["r"]) for r in method_rows] == list(range(15))
      assert float(method_rows[0]["CA"]) == pytest.approx(before["CA"], abs=1e-3)
      assert float(method_rows[0]["ASR_real"]) == pytest.approx(before["ASR"], abs=1e-3)
      if method != "fine_pruning":
        chosen = next(r for r in method_rows if r["r_star"] == "1")
        assert result[source][method]["CA"] == pytest.approx(float(chosen["CA"]), abs=1e-3)
    with open(os.path.join(stage_dir, f"curves_{source}.png"), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  synthetic = result["synthetic"]
  assert synthetic["fine_tuning"]["r_star"] == 0
  assert synthetic["linf_layers"]["r_star"] == synthetic["linf_layers_ft"]["r_star"]
  for norm in ("linf", "l2", "l1"):
    assert synthetic[norm + "_ft"]["r_star"] == synthetic[norm]["r_star"]
  with open(os.path.join(stage_dir, "curves_synthetic_layers.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert not os.path.exists(os.path.join(stage_dir, "curves_real_layers.png"))
  assert sorted(os.listdir(os.path.join(stage_dir, "synthetic"))) == sorted(
      f"{method}.{ext}" for method in METHODS for ext in ("json", "npz"))
  with open(os.path.join(stage_dir, "synthetic", "linf_layers.json")) as f:
    record = json.load(f)
  assert set(record["details"]["scores"]) == set(layers)
  assert record["details"]["chosen_on"] == "S"

  monkeypatch.setattr(prune, "sweep", lambda *a, **k: pytest.fail("finished sweep recomputed"))
  monkeypatch.setattr(finetune, "fine_tune", lambda *a, **k: pytest.fail("fine-tuned again"))
  assert prune_stage.run(ctx) == result

  config.prune.update(level_unit="count", levels=(3, 17))
  with pytest.raises(config_lib.ConfigError, match=r"config.prune.levels: .*\[0, 16\]"):
    prune_stage.run(ctx)


def test_levels_are_chosen_on_the_clean_set_only(cifar_dir, tmp_path, monkeypatch):
  """Another test split changes the reported numbers but no method's level."""
  chosen, reported = [], []
  for test_limit in (0, 12):
    config = tiny_config(cifar_dir)
    config.stages = ("train", "reverse", "prune")
    config.data.test_limit = test_limit
    ctx = pipeline.make_context(config, str(tmp_path / f"run{test_limit}"), progress=False)
    model = ctx.model()
    variables = models.init(model, jax.random.key(9), ctx.dataset.image_shape)
    monkeypatch.setattr(train_stage, "load_trained", lambda ctx, kind: (model, variables))
    result = prune_stage.run(ctx)["real"]
    chosen.append({method: entry["r_star"] for method, entry in result.items()})
    reported.append({method: entry["CA"] for method, entry in result.items()})
  assert len(ctx.dataset.test_labels) == 12
  assert chosen[0] == chosen[1]
  assert reported[0] != reported[1]


def test_baselines_in_the_stage_equal_the_library_defenses(cifar_dir, tmp_path, monkeypatch):
  """ANP, CLP and NC unlearning run for the synthetic trigger only; each entry is its library
  defense's model evaluated on the test split, and a rerun reuses the saved numbers."""
  workdir = str(tmp_path / "run")
  config = tiny_config(cifar_dir)
  config.stages = ("train", "reverse", "prune")
  config.prune.defenses = ("linf", "l2", "l1", "anp", "clp", "nc_unlearning")
  config.prune.real_defenses = ("linf", "l2", "l1")
  config.prune.anp.update(iterations=3, threshold=0.9)
  config.prune.clp.u = 0.5
  ctx = pipeline.make_context(config, workdir, progress=False)
  model = ctx.model()
  variables = models.init(model, jax.random.key(9), ctx.dataset.image_shape)
  monkeypatch.setattr(train_stage, "load_trained", lambda ctx, kind: (model, variables))
  mask = np.zeros((32, 32, 1), np.float32)
  mask[:3, :3] = 1.0
  pattern = np.ones((32, 32, 3), np.float32)
  os.makedirs(os.path.join(workdir, "reverse"), exist_ok=True)
  np.savez(os.path.join(workdir, "reverse", "synthetic_trigger.npz"), mask=mask,
           pattern=pattern, target=np.int64(2), flagged=True)
  result = prune_stage.run(ctx)
  assert set(result["real"]) == {"linf", "l2", "l1"}
  synthetic = result["synthetic"]
  assert set(synthetic) == {"linf", "l2", "l1", "anp", "clp", "nc_unlearning"}
  s_images, s_labels = ctx.clean_set
  key = lambda salt: jax.random.fold_in(jax.random.key(config.seed), salt)
  clp_variables, clp_keep, _ = clp.defend(model, variables, ctx.dataset.image_shape, u=0.5)
  anp_keep = anp.keep_above(anp.as_written(anp.learn_masks(
      model.apply, variables, s_images, s_labels, key=key(keys.ANP),
      settings=anp.Hyperparameters(iterations=3, padding=config.train.crop_padding,
                                   flip=bool(config.train.flip)))), 0.9)
  recipe = finetune.Recipe(
      epochs=config.prune.fine_tune.epochs, learning_rate=config.prune.fine_tune.learning_rate,
      momentum=config.train.momentum, weight_decay=config.train.weight_decay,
      batch_size=config.prune.fine_tune.batch_size, padding=config.train.crop_padding,
      flip=bool(config.train.flip), padding_mode=config.train.padding_mode,
      nesterov=bool(config.train.nesterov))
  unlearned = unlearning.unlearn(model, variables, s_images, s_labels,
                                 attacks.Trigger(mask, pattern), recipe,
                                 key=key(keys.NC_UNLEARNING), share=0.2)
  expected = {"clp": (clp_variables, anp.num_pruned(clp_keep)),
              "anp": (anp.pruned_variables(variables, anp_keep), anp.num_pruned(anp_keep)),
              "nc_unlearning": (unlearned, 0)}
  assert expected["clp"][1] > 0 and expected["anp"][1] > 0
  for name, (defended, pruned) in expected.items():
    numbers = metrics.evaluate(model.apply, defended, ctx.dataset.test_images,
                               ctx.dataset.test_labels, ctx.trigger, target=0,
                               mode="all_to_one", num_classes=10, batch_size=32)
    assert synthetic[name]["r_star"] == pruned
    assert synthetic[name]["CA"] == pytest.approx(numbers["CA"], abs=1e-3)
    assert synthetic[name]["ASR_real"] == pytest.approx(numbers["ASR"], abs=1e-3)
    # The defender's view: the defended model on S under the synthetic trigger.
    on_s = metrics.evaluate(model.apply, defended, s_images, s_labels,
                            attacks.Trigger(mask, pattern), target=2, mode="all_to_one",
                            num_classes=10, batch_size=32)
    assert synthetic[name]["ASR_defender"] == pytest.approx(on_s["ASR"], abs=1e-3)

  with open(os.path.join(workdir, "prune", "synthetic", "nc_unlearning.json")) as f:
    details = json.load(f)["details"]
  assert details["flagged"] is True and details["unlearned"] is True  # From the trigger file.
  monkeypatch.setattr(anp, "learn_masks", lambda *a, **k: pytest.fail("ANP learned again"))
  monkeypatch.setattr(unlearning, "unlearn", lambda *a, **k: pytest.fail("unlearned again"))
  assert prune_stage.run(ctx) == result
