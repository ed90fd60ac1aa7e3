"""The API (linfjax/api/), one test per verb, each against an independent computation:
the pipeline's own run directory, NumPy on the model's activations, or values by hand."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT, write_cifar_dir
from test_pipeline import tiny_config

import linfjax
from linfjax import attacks, data, models
from linfjax import config as config_lib
from linfjax.defenses import pruning
from linfjax.detection import neural_cleanse
from linfjax.runs import pipeline

IMAGE_SHAPE = (32, 32, 3)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A tiny run of the train and reverse stages, written through `linfjax.run`."""
  root = tmp_path_factory.mktemp("api")
  cifar = str(root / "cifar")
  write_cifar_dir(cifar)
  config = tiny_config(cifar)
  config.stages = ("train", "reverse")
  workdir = str(root / "run")
  return config, workdir, linfjax.run(config, workdir)


def _small_model(width=0.25, probe_layers=()):
  model = models.create("cnn", num_classes=10, width=width, probe_layers=probe_layers)
  return model, models.init(model, jax.random.key(0), IMAGE_SHAPE)


def _images(count, seed=0):
  return np.asarray(jax.random.randint(jax.random.key(seed), (count, *IMAGE_SHAPE), 0, 256),
                    np.uint8)


def _patch():
  return linfjax.make_attack("patch", IMAGE_SHAPE)


def _stamped_corner(images):
  """BadNets' 3x3 white corner stamped by hand on float images in [0, 1]."""
  stamped = np.array(images, np.float32)
  stamped[:, -3:, -3:, :] = 1.0
  return stamped


def test_import_is_lazy_and_exports_the_api():
  code = (
      "import sys, linfjax\n"
      "assert 'jax' not in sys.modules, 'import linfjax loaded JAX'\n"
      "assert 'train' in dir(linfjax) and linfjax.__version__\n"
      "verb = linfjax.train\n"
      "import linfjax.api\n"
      "assert verb is linfjax.api.train and 'jax' in sys.modules\n"
      "assert set(linfjax.__all__) - {'__version__'} == set(linfjax.api.__all__)\n"
      "assert all(callable(getattr(linfjax, name)) for name in linfjax.api.__all__)\n"
      "from linfjax import data\n"
      "assert not hasattr(linfjax, 'no_such_name')\n"
      "print('lazy ok')\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "lazy ok"


def test_load_dataset_from_a_config_or_its_data_block(cifar_dir, tmp_path):
  written, labels = write_cifar_dir(str(tmp_path / "again"))  # The same seed: the same data.
  expected = np.concatenate(written[:5]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  config = tiny_config(cifar_dir)
  dataset = linfjax.load_dataset(config)
  np.testing.assert_array_equal(dataset.train_images, expected)
  np.testing.assert_array_equal(dataset.train_labels, np.concatenate(labels[:5]))
  np.testing.assert_array_equal(dataset.test_labels, labels[5])
  assert dataset.train_images.dtype == np.uint8 and dataset.num_classes == 10
  config.data.train_limit = 30
  limited = linfjax.load_dataset(config.data)
  np.testing.assert_array_equal(limited.train_images, expected[:30])
  config.data.source = "nowhere"
  with pytest.raises(config_lib.ConfigError, match="config.data.source"):
    linfjax.load_dataset(config)
  with pytest.raises(TypeError, match="run config or its `data` block"):
    linfjax.load_dataset({"source": "cifar10_dir"})


def test_clean_set_holds_out_whole_groups():
  groups = np.arange(60) // 6  # 10 groups of 6 near-duplicates.
  dataset = data.Dataset(_images(60), (groups % 5).astype(np.int32), _images(4),
                         np.zeros(4, np.int32), tuple("abcde"), train_groups=groups)
  split = linfjax.clean_set(dataset, size=10, seed=3)
  held, kept = split.clean_set_indices, split.train_indices
  np.testing.assert_array_equal(np.sort(np.concatenate([held, kept])), np.arange(60))
  assert set(groups[held]).isdisjoint(groups[kept])
  assert len(held) == 12  # Two whole groups: the fewest holding at least 10 images.
  assert len(set(dataset.train_labels[held])) == 2  # One group of each class in turn.

  plain = data.Dataset(_images(60), np.zeros(60, np.int32), _images(4), np.zeros(4, np.int32),
                       ("a",))
  first = linfjax.clean_set(plain, size=10, seed=3)
  assert len(first.clean_set_indices) == 10 and len(first.train_indices) == 50
  np.testing.assert_array_equal(first.clean_set_indices,
                                linfjax.clean_set(plain, size=10, seed=3).clean_set_indices)
  assert not np.array_equal(first.clean_set_indices,
                            linfjax.clean_set(plain, size=10, seed=4).clean_set_indices)


def test_make_attack_patch_stamps_exactly_the_corner():
  images = np.asarray(jax.random.uniform(jax.random.key(1), (4, *IMAGE_SHAPE)))
  stamp = jax.jit(attacks.apply)
  np.testing.assert_array_equal(stamp(_patch(), images), _stamped_corner(images))

  red = linfjax.make_attack("patch", IMAGE_SHAPE, size=5, position="top_left",
                            color=(1.0, 0.0, 0.0))
  expected = np.array(images)
  expected[:, :5, :5, :] = (1.0, 0.0, 0.0)
  np.testing.assert_array_equal(stamp(red, images), expected)

  config = tiny_config("unused")
  config.trigger.update(attacks.PRESETS["blend"])
  blend = linfjax.make_attack(config, IMAGE_SHAPE, alpha=0.5)
  assert config.trigger.alpha == 0.2  # The config is not modified.
  np.testing.assert_allclose(stamp(blend, images),
                             0.5 * images + 0.5 * np.asarray(blend.pattern)[None], rtol=1e-6)
  with pytest.raises(attacks.TriggerError, match="unknown attack 'badnets'; known: patch"):
    linfjax.make_attack("badnets", IMAGE_SHAPE)
  with pytest.raises(attacks.TriggerError, match="unknown trigger field.* colour"):
    linfjax.make_attack("patch", IMAGE_SHAPE, colour=(1.0, 1.0, 1.0))
  with pytest.raises(config_lib.ConfigError, match="9x9 patch"):
    linfjax.make_attack("patch", (8, 8, 3), size=9)


def test_poison_relabels_and_flags_round_rate_n_examples(cifar_dir):
  config = tiny_config(cifar_dir)
  dataset = linfjax.load_dataset(config)
  split = linfjax.clean_set(dataset, size=20, seed=config.seed)
  original = dataset.train_labels[split.train_indices]
  poisoned = linfjax.poison(config, dataset, split, _patch())
  chosen = poisoned.poison_indices
  assert len(chosen) == round(0.2 * 80) == 16
  assert np.all(original[chosen] != 0)  # Only images the attack can flip.
  np.testing.assert_array_equal(poisoned.labels[chosen], 0)
  others = np.setdiff1d(np.arange(80), chosen)
  np.testing.assert_array_equal(poisoned.labels[others], original[others])
  np.testing.assert_array_equal(np.flatnonzero(poisoned.stamp_after_augmentation), chosen)
  np.testing.assert_array_equal(poisoned.images, dataset.train_images[split.train_indices])

  config.poison.stamp = "before_augmentation"
  stamped = linfjax.poison(config, dataset, split, _patch())
  np.testing.assert_array_equal(stamped.poison_indices, chosen)
  expected = np.array(dataset.train_images[split.train_indices])
  expected[chosen, -3:, -3:, :] = 255
  np.testing.assert_array_equal(stamped.images, expected)
  assert not stamped.stamp_after_augmentation.any()


def test_train_gives_the_train_stages_models(tiny_run):
  config, workdir, run = tiny_run
  dataset = linfjax.load_dataset(config)
  split = linfjax.clean_set(dataset, size=config.data.clean_set_size, seed=config.seed)
  np.testing.assert_array_equal(split.clean_set_indices, run.split.clean_set_indices)
  with np.load(os.path.join(workdir, "train", "split.npz")) as saved:
    np.testing.assert_array_equal(
        linfjax.poison(config, dataset, split, run.trigger).poison_indices,
        saved["poison_indices"])
  for backdoored, kind in ((True, "backdoored"), (False, "vanilla")):
    epochs = []
    model, variables = linfjax.train(config, dataset, split, _patch(), backdoored=backdoored,
                                     on_epoch_end=lambda epoch, m: epochs.append((epoch, m)))
    assert [epoch for epoch, _ in epochs] == [1, 2]
    assert all(np.isfinite(m["loss"]) for _, m in epochs)
    stage_model, stage_variables = run.model(kind)
    assert model is stage_model
    jax.tree.map(np.testing.assert_array_equal, variables, stage_variables)
  assert not np.array_equal(run.backdoored[1]["params"]["head"]["kernel"],
                            run.vanilla[1]["params"]["head"]["kernel"])


def test_evaluate_matches_predictions_by_hand():
  model, variables = _small_model()
  images = _images(13, seed=2)
  x = images.astype(np.float32) / 255.0
  predict = jax.jit(lambda v, x, masks: jnp.argmax(model.apply(v, x, masks)[0], -1))
  clean = np.asarray(predict(variables, x, None))
  labels = np.where(np.arange(13) % 2 == 0, clean, (clean + 3) % 10).astype(np.int32)

  def by_hand(clean_predictions, triggered_predictions, attack_labels):
    flippable = labels != attack_labels
    return {"CA": 100.0 * np.mean(clean_predictions == labels),
            "ASR": 100.0 * np.mean(triggered_predictions[flippable] == attack_labels[flippable]),
            "RA": 100.0 * np.mean(triggered_predictions[flippable] == labels[flippable])}

  triggered = np.asarray(predict(variables, _stamped_corner(x), None))
  got = linfjax.evaluate(model, variables, (images, labels), _patch(), target=4, batch_size=5)
  expected = by_hand(clean, triggered, np.full(13, 4))
  assert got == pytest.approx(expected, abs=1e-9)
  dataset = data.Dataset(images[:1], labels[:1], images, labels, tuple("abcdefghij"))
  assert linfjax.evaluate(model, variables, dataset, _patch(), target=4) == got
  all_to_all = linfjax.evaluate(model, variables, (images, labels), _patch(), target=0,
                                mode="all_to_all")
  assert all_to_all == pytest.approx(by_hand(clean, triggered, (labels + 1) % 10), abs=1e-9)

  mask = np.ones(32, np.float32)  # conv3_2 of the quarter-width CNN has 32 channels.
  mask[::2] = 0.0
  masks = {"conv3_2": mask}
  got = linfjax.evaluate(model, variables, (images, labels), _patch(), target=4, masks=masks,
                         batch_size=5)
  expected = by_hand(np.asarray(predict(variables, x, masks)),
                     np.asarray(predict(variables, _stamped_corner(x), masks)), np.full(13, 4))
  assert got == pytest.approx(expected, abs=1e-9)


def test_reverse_engineer_and_detect_give_the_reverse_stages_outcome(tiny_run):
  config, workdir, run = tiny_run
  model, variables = run.backdoored
  images, _ = run.clean_set
  found = linfjax.reverse_engineer(model, variables, images, settings=config, seed=config.seed)
  assert found.masks.shape == (10, 32, 32) and found.patterns.shape == (10, 32, 32, 3)
  np.testing.assert_allclose(found.mask_l1, found.masks.sum(axis=(1, 2)), rtol=1e-5)
  with np.load(os.path.join(workdir, "reverse", "backdoored", "triggers.npz")) as saved:
    for field in ("masks", "patterns", "mask_l1", "succeeded"):
      np.testing.assert_array_equal(getattr(found, field), saved[field])
  typed = neural_cleanse.Settings.from_config(config.reverse)
  again = linfjax.reverse_engineer(model, variables, images, settings=typed, seed=config.seed)
  np.testing.assert_array_equal(again.masks, found.masks)
  verdict = linfjax.detect(found, statistic=config.reverse.statistic)
  assert verdict.flagged == run.results["reverse"]["flagged"]
  assert verdict.suspect == run.results["reverse"]["suspect"]


def test_detect_flags_a_planted_outlier_norm():
  norms = np.array([50.0, 52.0, 48.0, 55.0, 47.0, 51.0, 49.0, 53.0, 5.0, 50.0])
  nc = linfjax.detect(norms, statistic="nc")
  median = np.median(norms)
  mad = 1.4826 * np.median(np.abs(norms - median))
  np.testing.assert_allclose(nc.index, np.abs(norms - median) / mad, rtol=1e-5)
  assert nc.flagged == 8 and nc.suspect == 8
  ratio = linfjax.detect(norms)  # The config's default statistic.
  assert ratio.statistic == "ratio" and ratio.flagged == 8
  np.testing.assert_allclose(ratio.index, median / norms)
  assert linfjax.detect(norms, statistic="nc", threshold=100.0).flagged is None
  failed = np.ones(10, bool)
  failed[8] = False
  unsure = linfjax.detect(norms, succeeded=failed, statistic="nc")
  assert unsure.flagged is None and unsure.suspect == 4  # The smallest norm that succeeded.
  found = neural_cleanse.Reversed(np.zeros((10, 2, 2)), np.zeros((10, 2, 2, 3)), norms, failed)
  assert linfjax.detect(found, statistic="nc").suspect == 4
  assert linfjax.detect(np.full(10, 50.0) + np.arange(10)).flagged is None


def _per_image_norms(model, variables, x, layers):
  """[images, 3 (l1, l2, linf), K] norms of each layer's maps, by NumPy."""
  probing = model.clone(probe_layers=layers)
  _, activations = jax.jit(probing.apply)(variables, x)
  out = {}
  for layer in layers:
    a = np.abs(np.asarray(activations[layer], np.float64))
    out[layer] = np.stack([a.sum(axis=(1, 2)), np.sqrt((a ** 2).sum(axis=(1, 2))),
                           a.max(axis=(1, 2))], axis=1)
  return out


def test_activation_shifts_match_numpy_on_the_activations():
  model, variables = _small_model()
  images = _images(7, seed=3)
  x = images.astype(np.float32) / 255.0
  layers = ("conv2_2", "conv3_2")
  shifts = linfjax.activation_shifts(model, variables, images, _patch(), layers=layers,
                                     batch_size=3)
  clean = _per_image_norms(model, variables, x, layers)
  triggered = _per_image_norms(model, variables, _stamped_corner(x), layers)
  assert set(shifts) == set(layers)
  for layer in layers:
    delta = triggered[layer].mean(0) - clean[layer].mean(0)
    for n, norm in enumerate(("l1", "l2", "linf")):
      np.testing.assert_allclose(shifts[layer].delta[norm], delta[n], rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(shifts[layer].moments.mean[0, n], clean[layer].mean(0)[n],
                                 rtol=1e-5)
      z = (delta[n].max() - delta[n].mean()) / delta[n].std()
      assert shifts[layer].summary[norm]["z"] == pytest.approx(z, rel=1e-3)
  default = linfjax.activation_shifts(model, variables, images, _patch())
  assert list(default) == ["conv3_2"]  # The model's last conv map.
  np.testing.assert_allclose(default["conv3_2"].delta["linf"], shifts["conv3_2"].delta["linf"],
                             atol=1e-5)


def test_defend_linf_zeroes_exactly_r_star_top_shifted_channels():
  model, variables = _small_model()
  images = _images(40, seed=4)
  labels = np.asarray(jax.random.randint(jax.random.key(5), (40,), 0, 10), np.int32)
  settings = pruning.Settings(levels=(2, 4, 8), level_unit="count", tau=0.0, delta=100.0)
  record = linfjax.defend("linf", model, variables, images, labels, trigger=_patch(), target=0,
                          settings=settings)
  (layer, mask), = record.masks.items()
  assert layer == "conv3_2" and mask.shape == (32,)
  assert set(np.unique(mask)) <= {0.0, 1.0}
  assert int((mask == 0).sum()) == record.pruned

  x = images.astype(np.float32) / 255.0
  linf = 2
  delta = (_per_image_norms(model, variables, _stamped_corner(x), (layer,))[layer].mean(0)
           - _per_image_norms(model, variables, x, (layer,))[layer].mean(0))[linf]
  order = np.argsort(-delta, kind="stable")
  curve = record.curve
  np.testing.assert_array_equal(curve.pruned, [0, 2, 4, 8])
  predict = jax.jit(lambda v, x, masks: jnp.argmax(model.apply(v, x, masks)[0], -1))
  flippable = labels != 0
  for level, count in enumerate(curve.pruned):
    level_mask = curve.masks[layer][level]
    np.testing.assert_array_equal(np.flatnonzero(level_mask == 0), np.sort(order[:count]))
    masks = {layer: level_mask}
    ca = 100.0 * np.mean(np.asarray(predict(variables, x, masks)) == labels)
    asr = 100.0 * np.mean(np.asarray(predict(variables, _stamped_corner(x), masks))[flippable] == 0)
    assert curve.clean_set["CA_S"][level] == pytest.approx(ca)
    assert curve.clean_set["ASR_defender"][level] == pytest.approx(asr)
  np.testing.assert_array_equal(mask, curve.masks[layer][curve.chosen])
  assert record.pruned == curve.pruned[curve.chosen]

  with pytest.raises(ValueError, match="unknown defense 'linf2'; known: linf, linf_ft"):
    linfjax.defend("linf2", model, variables, images, labels)
  with pytest.raises(ValueError, match="'l2' needs the defender's trigger and target"):
    linfjax.defend("l2", model, variables, images, labels, trigger=_patch())


def test_run_writes_the_pipelines_results_and_resumes(tiny_run, monkeypatch):
  config, workdir, run = tiny_run
  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)
  assert run.results == on_disk and set(on_disk) == {"seed", "train", "reverse"}
  assert on_disk["train"]["poisoned"] == 16 and on_disk["train"]["clean_set"] == 20
  assert os.path.exists(os.path.join(workdir, "reverse", "synthetic_trigger.npz")) == (
      on_disk["reverse"]["suspect"] is not None)

  def must_not_run(ctx):
    raise AssertionError("a finished stage ran again")

  monkeypatch.setitem(pipeline.STAGES, "train", must_not_run)
  monkeypatch.setitem(pipeline.STAGES, "reverse", must_not_run)
  assert linfjax.run(config, workdir).results == on_disk
  other = tiny_config(config.data.path, epochs=3)
  other.stages = config.stages
  with pytest.raises(pipeline.WorkdirError, match="train.epochs: 2 in the workdir, 3 now"):
    linfjax.run(other, workdir)


def test_load_run_gives_back_the_runs_results_models_and_trigger(tiny_run, tmp_path):
  config, workdir, _ = tiny_run
  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)
  loaded = linfjax.load_run(workdir)
  assert loaded.results == on_disk
  assert loaded.config.to_json() == config.to_json()
  assert isinstance(loaded.config.model.probe_layers, tuple)
  pipeline.check_workdir(loaded.config, workdir)  # The same config: the run would resume.
  for kind in ("backdoored", "vanilla"):
    model, variables = loaded.model(kind)
    numbers = linfjax.evaluate(model, variables, loaded.dataset, loaded.trigger,
                               target=config.poison.target, mode=config.poison.mode,
                               batch_size=config.train.eval_batch_size)
    assert numbers == on_disk["train"][kind]
  synthetic = loaded.synthetic_trigger
  suspect = on_disk["reverse"]["suspect"]
  if suspect is None:
    assert synthetic is None
  else:
    assert synthetic.target == suspect
    assert synthetic.flagged == (on_disk["reverse"]["flagged"] is not None)
    with np.load(os.path.join(workdir, "reverse", "backdoored", "triggers.npz")) as saved:
      np.testing.assert_array_equal(np.asarray(synthetic.trigger.mask)[..., 0],
                                    saved["masks"][suspect])
  with pytest.raises(ValueError, match="unknown model kind 'clean'"):
    loaded.model("clean")
  with pytest.raises(pipeline.WorkdirError, match="no config.json"):
    linfjax.load_run(str(tmp_path))
