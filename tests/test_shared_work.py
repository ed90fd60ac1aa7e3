"""Shared work in a grid: each distinct vanilla model trained once and solved by Neural
Cleanse once, runs identical to alone."""

import json
import os

import jax
import numpy as np
import pytest

from linfjax.runs import pipeline, shared_work, sweep
from linfjax.detection import neural_cleanse as reverse
from linfjax.training import train
from linfjax.runs.stages import reverse as reverse_stage
from linfjax.runs.stages import train as train_stage
from test_pipeline import tiny_config


def test_key_depends_on_values_not_order_and_claims_exclude(tmp_path):
  shared = shared_work.SharedWork(str(tmp_path))
  piece = shared.piece("model", {"seed": 0, "train": {"epochs": 2, "lr": 0.1}})
  assert piece.key == shared.piece("model", {"train": {"lr": 0.1, "epochs": 2}, "seed": 0}).key
  assert piece.key != shared.piece("model", {"seed": 1, "train": {"epochs": 2, "lr": 0.1}}).key
  assert piece.directory == os.path.join(str(tmp_path), "model", piece.key)
  with piece.claim() as taken:
    assert taken and not piece.done
    # A second claim (another open file, as another process would have) is refused.
    with shared.piece("model", piece.depends_on).claim(wait=False) as again:
      assert not again
    piece.mark_done({"epochs": 2})
  with piece.claim(wait=False) as taken:
    assert taken and piece.done and piece.summary() == {"epochs": 2}
  with open(piece.path("depends_on.json")) as f:
    assert json.load(f) == piece.depends_on


def test_vanilla_dependencies_ignore_trigger_poison_and_evaluation(cifar_dir):
  config = tiny_config(cifar_dir)
  base = train_stage.vanilla_dependencies(config)
  config.poison.rate, config.trigger.size, config.train.eval_batch_size = 0.3, 5, 7
  config.reverse.steps = 9
  assert train_stage.vanilla_dependencies(config) == base
  for field, value in (("seed", 3), ("train.learning_rate", 0.2), ("model.width", 0.25),
                       ("data.clean_set_size", 21)):
    assert train_stage.vanilla_dependencies(_changed(cifar_dir, field, value)) != base, field


def _changed(cifar_dir, field: str, value):
  """tiny_config with one dotted field set to `value`."""
  config = tiny_config(cifar_dir)
  block, _, leaf = field.rpartition(".")
  (config[block] if block else config)[leaf] = value
  return config


def test_vanilla_reverse_dependencies_add_the_solve_not_the_detection(cifar_dir):
  config = tiny_config(cifar_dir)
  base = reverse_stage.vanilla_dependencies(config)
  config.poison.rate, config.reverse.statistic, config.reverse.anomaly_threshold = 0.3, "nc", 2.5
  config.reverse.checkpoint_every = 1
  assert reverse_stage.vanilla_dependencies(config) == base
  for field, value in (("seed", 3), ("train.epochs", 3), ("reverse.steps", 3),
                       ("reverse.learning_rate", 0.2), ("reverse.success_images", 10)):
    assert reverse_stage.vanilla_dependencies(_changed(cifar_dir, field, value)) != base, field


def _grid(cifar_dir):
  config = tiny_config(cifar_dir)
  config.stages = ("train",)
  config.sweep.axes = "poison.rate=0.1,0.2"
  return config


def _count_fits(monkeypatch, *, die_at=None) -> list:
  """Patches train.fit to record each model's stamp count (0: a vanilla model); with
  `die_at=n`, the n-th fit raises KeyboardInterrupt after saving its first epoch."""
  fits, real_fit = [], train.fit

  def recording_fit(state, data, trigger, recipe, **kwargs):
    fits.append(int(np.sum(np.asarray(data.stamp))))
    if len(fits) == die_at:
      on_epoch_end = kwargs.pop("on_epoch_end")

      def save_then_die(epoch, state, metrics):
        on_epoch_end(epoch, state, metrics)
        raise KeyboardInterrupt

      kwargs["on_epoch_end"] = save_then_die
    return real_fit(state, data, trigger, recipe, **kwargs)

  monkeypatch.setattr(train, "fit", recording_fit)
  return fits


def _vanilla_params(config, workdir):
  ctx = pipeline.make_context(config, workdir, progress=False)
  return train_stage.load_trained(ctx, "vanilla")[1]["params"]


def test_grid_trains_each_vanilla_model_once_and_equals_runs_alone(cifar_dir, tmp_path,
                                                                  monkeypatch):
  workdir = str(tmp_path / "grid")
  fits = _count_fits(monkeypatch, die_at=2)  # The shared vanilla model, after epoch 1.
  with pytest.raises(KeyboardInterrupt):
    sweep.run(_grid(cifar_dir), workdir, progress=False)
  fits = _count_fits(monkeypatch)
  statuses = sweep.run(_grid(cifar_dir), workdir, progress=False)
  assert set(statuses.values()) == {"finished"}
  # The first run's backdoored model (finished: no epoch left) and the shared vanilla model
  # (resumed at epoch 2), then the second run's backdoored model only.
  assert len(fits) == 3 and fits[0] > 0 and fits[1] == 0 and fits[2] > 0
  pieces = os.listdir(os.path.join(workdir, "shared", train_stage.VANILLA_PIECE))
  assert len([p for p in pieces if not p.endswith(".lock")]) == 1
  monkeypatch.undo()
  alone_config = tiny_config(cifar_dir)
  alone_config.stages = ("train",)
  alone_config.poison.rate = 0.2
  alone = pipeline.run(alone_config, str(tmp_path / "alone"), progress=False)
  run_dir = os.path.join(workdir, "runs", "poison.rate=0.2")
  with open(os.path.join(run_dir, "results.json")) as f:
    assert json.load(f) == alone
  for grid_run in ("poison.rate=0.1", "poison.rate=0.2"):
    in_grid = _vanilla_params(alone_config, os.path.join(workdir, "runs", grid_run))
    by_itself = _vanilla_params(alone_config, str(tmp_path / "alone"))
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, in_grid, by_itself)))
  for grid_run, trained_here in (("poison.rate=0.1", True), ("poison.rate=0.2", False)):
    with open(os.path.join(workdir, "runs", grid_run, "train", "metrics.json")) as f:
      vanilla_log = json.load(f)["vanilla"]
    assert [e["epoch"] for e in vanilla_log["epochs"]] == [2]  # Epoch 1 ran before the kill.
    assert vanilla_log["trained_by_this_run"] is trained_here


def test_grid_solves_each_vanilla_model_once_and_equals_runs_alone(cifar_dir, tmp_path,
                                                                  monkeypatch):
  config = tiny_config(cifar_dir)
  config.stages = ("train", "reverse")
  config.sweep.axes = "poison.rate=0.1,0.2"
  solves, real_solve = [], reverse.solve

  def recording_solve(*args, **kwargs):
    solves.append(kwargs["num_classes"])
    return real_solve(*args, **kwargs)

  monkeypatch.setattr(reverse, "solve", recording_solve)
  workdir = str(tmp_path / "grid")
  assert set(sweep.run(config, workdir, progress=False).values()) == {"finished"}
  assert len(solves) == 3  # Each run's backdoored model, and the one vanilla model.
  monkeypatch.undo()
  alone_config = tiny_config(cifar_dir)
  alone_config.stages = ("train", "reverse")
  alone_config.poison.rate = 0.2
  alone = pipeline.run(alone_config, str(tmp_path / "alone"), progress=False)
  run_dirs = {rate: os.path.join(workdir, "runs", f"poison.rate={rate}") for rate in (0.1, 0.2)}
  with open(os.path.join(run_dirs[0.2], "results.json")) as f:
    assert json.load(f) == alone
  with open(os.path.join(run_dirs[0.1], "results.json")) as f:
    assert json.load(f)["reverse"]["vanilla"] == alone["reverse"]["vanilla"]
  by_itself = np.load(os.path.join(tmp_path, "alone", "reverse", "vanilla", "triggers.npz"))
  for rate, solved_here in ((0.1, True), (0.2, False)):
    in_grid = np.load(os.path.join(run_dirs[rate], "reverse", "vanilla", "triggers.npz"))
    assert sorted(in_grid.files) == sorted(by_itself.files)
    for name in by_itself.files:
      np.testing.assert_array_equal(in_grid[name], by_itself[name], err_msg=name)
    with open(os.path.join(run_dirs[rate], "reverse", "metrics.json")) as f:
      assert json.load(f)["vanilla"]["solved_by_this_run"] is solved_here
