"""Bars count finished work only; the outer bar follows planned work; logs go above the bars."""

import logging as std_logging
import os

import pytest
import tqdm
from absl import flags, logging
from test_pipeline import tiny_config

from linfjax.runs import pipeline, progress


class _Output:
  """A step output that records when someone waits for it."""

  def __init__(self, index, waited):
    self.index, self.waited = index, waited

  def block_until_ready(self):
    self.waited.append(self.index)
    return self


def test_bar_advances_only_on_outputs_it_has_waited_for():
  waited = []
  tracker = progress.Tracker(enabled=True)
  bar = tracker.bar("steps", total=10, every=2)
  for i in range(3):
    bar.update(result=_Output(i, waited))
  assert bar.finished == 0 and waited == []  # Three steps in flight: nothing known finished.
  bar.update(result=_Output(3, waited))
  assert bar.finished == 2 and waited == [0, 1]  # Waited on the older half only.
  for i in range(4, 10):
    bar.update(result=_Output(i, waited))
  assert bar.finished == 8 and waited == list(range(8))
  bar.close()
  assert bar.finished == 10 and waited == list(range(10))


def test_disabled_bar_holds_no_outputs_and_never_waits():
  waited = []
  bar = progress.Tracker(enabled=False).bar("steps", total=5)
  for i in range(5):
    bar.update(result=_Output(i, waited))
  bar.close()
  assert bar.finished == 5 and waited == []
  assert not progress.Tracker(enabled=False)


def test_outer_bar_follows_stage_parts_resumed_work_and_failed_runs():
  tracker = progress.Tracker(enabled=True, desc="grid")
  tracker.plan("a", {"train": 100.0, "reverse": 50.0})
  tracker.plan("b", {"train": 100.0})
  tracker.plan("a", {"train": 999.0})  # Planned once.
  assert tracker.total == 250.0
  with tracker.stage("a", "train"):
    first = tracker.bar("backdoored", total=10, part=0.5)
    first.update(10)
    assert tracker.done == 50.0
    second = tracker.bar("vanilla", total=10, part=0.5, initial=4)  # 4 steps done earlier.
    assert tracker.total == 250.0 - 20.0
    second.update(2)
    assert tracker.done == 60.0
  assert tracker.done == 80.0  # The stage's end tops it up to the stage's planned work.
  with pytest.raises(RuntimeError):
    with tracker.stage("a", "reverse"):
      tracker.bar("reverse", total=5).update(1)
      raise RuntimeError("failed")
  assert tracker.done == 90.0
  tracker.abandon("a")  # The failed run's remaining 40 leave the total.
  assert tracker.total == 190.0
  with tracker.stage("b", "train"):
    tracker.bar("x", total=4).update(100)  # Capped at the stage's work.
    assert tracker.done == 190.0
  assert tracker._outer.n == pytest.approx(tracker._outer.total)
  tracker.close()


def test_log_lines_are_written_through_tqdm(monkeypatch):
  written = []
  monkeypatch.setattr(tqdm.tqdm, "write", classmethod(
      lambda cls, text, file=None, **kwargs: written.append(text)))
  flags.FLAGS.mark_as_parsed()  # As main does: absl logs to its stream only after parsing.
  handler = logging.get_absl_handler()  # What main attaches to the root logger.

  def emit(text):
    handler.emit(std_logging.LogRecord("absl", std_logging.WARNING, __file__, 1, text, (), None))

  with progress.route_logging():
    emit("a line above the bars")
  assert len(written) == 1 and written[0].endswith("a line above the bars")
  assert handler.python_handler.stream is not None and not isinstance(
      handler.python_handler.stream, progress._ThroughBars)


def test_pipeline_with_bars_finishes_every_bar(cifar_dir, tmp_path):
  config = tiny_config(cifar_dir)
  config.stages = ("train",)
  tracker = progress.Tracker(enabled=True)
  pipeline.run(config, str(tmp_path / "run"), progress=tracker)
  assert tracker.total > 0 and tracker.done == pytest.approx(tracker.total)
  assert os.path.exists(tmp_path / "run" / "results.json")
