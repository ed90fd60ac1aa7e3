"""End to end: the pipeline on a tiny slice writes results.json, skips and resumes."""

import json
import os

import numpy as np
import pytest

from linfjax import config as config_lib
from linfjax.runs import pipeline
from linfjax.training import train


def tiny_config(cifar_dir, **train_overrides):
  config = config_lib.make_quick(config_lib.base_config())
  config.data.path = cifar_dir
  config.data.clean_set_size = 20
  config.model.width = 0.125
  config.train.epochs = 2
  config.train.batch_size = 16
  config.train.eval_batch_size = 32
  config.poison.rate = 0.2
  config.reverse.update(steps=2, mini_batches=1)
  config.train.update(train_overrides)
  return config


def test_pipeline_writes_results_and_skips_finished_stage(cifar_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  config = tiny_config(cifar_dir)
  results = pipeline.run(config, workdir, progress=False)
  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)
  assert on_disk == results
  train_results = results["train"]
  assert results["seed"] == 0
  assert train_results["poisoned"] == round(0.2 * 80) and train_results["clean_set"] == 20
  for kind in ("backdoored", "vanilla"):
    assert set(train_results[kind]) == {"CA", "ASR", "RA"}
    assert all(0.0 <= v <= 100.0 for v in train_results[kind].values())
  split = np.load(os.path.join(workdir, "train", "split.npz"))
  assert len(np.intersect1d(split["clean_set_indices"], split["train_indices"])) == 0
  assert len(split["poison_indices"]) == 16
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["epochs"] == 2

  def must_not_run(ctx):
    raise AssertionError("a finished stage ran again")

  monkeypatch.setitem(pipeline.STAGES, "train", must_not_run)
  assert pipeline.run(config, workdir, progress=False) == results


def test_rerun_with_other_config_is_refused(cifar_dir, tmp_path):
  workdir = str(tmp_path / "run")
  pipeline.prepare_workdir(tiny_config(cifar_dir), workdir)
  with pytest.raises(pipeline.WorkdirError, match=r"train.epochs: 2 in the workdir, 3 now"):
    pipeline.prepare_workdir(tiny_config(cifar_dir, epochs=3), workdir)


def test_a_finished_run_takes_later_stages_without_training_again(cifar_dir, tmp_path,
                                                                  monkeypatch):
  """`stages` says what to run now: a train-only run directory later runs reverse on its
  models, and config.json records every stage asked for; any other field is still refused."""
  workdir = str(tmp_path / "run")
  config = tiny_config(cifar_dir)
  config.stages = ("train",)
  trained = pipeline.run(config, workdir, progress=False)
  assert "reverse" not in trained
  monkeypatch.setitem(pipeline.STAGES, "train",
                      lambda ctx: pytest.fail("the finished train stage ran again"))
  config.stages = ("reverse", "train")
  results = pipeline.run(config, workdir, progress=False)
  assert results["train"] == trained["train"]
  assert len(results["reverse"]["mask_l1"]) == 10
  config.stages = ("reverse",)
  pipeline.prepare_workdir(config, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["stages"] == ["train", "reverse"]
  other = tiny_config(cifar_dir, epochs=3)
  other.stages = ("train", "reverse", "analysis")
  with pytest.raises(pipeline.WorkdirError, match=r"\(train.epochs: 2 in the workdir, 3 now\)"):
    pipeline.prepare_workdir(other, workdir)


def test_killed_training_resumes_to_the_same_model(cifar_dir, tmp_path, monkeypatch):
  config = tiny_config(cifar_dir, epochs=3)
  straight = pipeline.run(config, str(tmp_path / "straight"), progress=False)

  real_fit = train.fit

  def fit_killed_after_first_epoch(state, data, trigger, recipe, **kwargs):
    on_epoch_end = kwargs.pop("on_epoch_end")

    def save_then_die(epoch, state, metrics):
      on_epoch_end(epoch, state, metrics)
      if epoch == 1:
        raise KeyboardInterrupt

    return real_fit(state, data, trigger, recipe, on_epoch_end=save_then_die, **kwargs)

  workdir = str(tmp_path / "killed")
  monkeypatch.setattr(train, "fit", fit_killed_after_first_epoch)
  with pytest.raises(KeyboardInterrupt):
    pipeline.run(config, workdir, progress=False)
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  monkeypatch.setattr(train, "fit", real_fit)
  resumed = pipeline.run(config, workdir, progress=False)
  with open(os.path.join(workdir, "train", "metrics.json")) as f:
    epochs_run = [e["epoch"] for e in json.load(f)["backdoored"]["epochs"]]
  assert epochs_run == [3]  # epochs 1 and 2 came from the checkpoint
  assert resumed["train"] == straight["train"]


def test_missing_dataset_fails_before_anything_is_trained(tmp_path):
  config = tiny_config(str(tmp_path / "absent"))
  with pytest.raises(Exception, match="absent: no such directory"):
    pipeline.run(config, str(tmp_path / "run"), progress=False)
  assert not os.path.exists(os.path.join(str(tmp_path / "run"), "train"))
