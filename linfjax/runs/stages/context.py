"""What every stage receives: the run's config, work directory, data and trigger."""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np

from linfjax import data
from linfjax import models
from linfjax.runs import progress as progress_lib, shared_work
from linfjax import attacks


@dataclasses.dataclass
class RunContext:
  """One run's inputs. Stages read from it and write under `stage_dir(name)`."""
  config: ml_collections.ConfigDict
  workdir: str
  dataset: data.Dataset
  split: data.Split
  trigger: attacks.Trigger
  # Stage bars come from `progress.bar(...)` (linfjax/runs/progress.py); a bool is turned into a
  # Tracker with that `enabled`. Falsy when bars are off.
  progress: progress_lib.Tracker | bool = True
  # A grid's shared pieces (linfjax/runs/shared_work.py): stages compute what several runs
  # need once there; None for a run on its own, which computes everything itself.
  shared: shared_work.SharedWork | None = None

  def __post_init__(self):
    if not isinstance(self.progress, progress_lib.Tracker):
      self.progress = progress_lib.Tracker(enabled=bool(self.progress))

  def stage_dir(self, stage: str) -> str:
    path = os.path.join(self.workdir, stage)
    os.makedirs(path, exist_ok=True)
    return path

  def model(self, **overrides) -> models.LayeredClassifier:
    """The config's model for this dataset (normalised with the training images' statistics)."""
    return models.from_config(self.config.model, num_classes=self.dataset.num_classes,
                              channel_stats=self.dataset.channel_stats,
                              compute_dtype=self.config.train.compute_dtype, **overrides)

  @property
  def train_images(self) -> np.ndarray:
    return self.dataset.train_images[self.split.train_indices]

  @property
  def train_labels(self) -> np.ndarray:
    return self.dataset.train_labels[self.split.train_indices]

  @property
  def clean_set(self) -> tuple[np.ndarray, np.ndarray]:
    """The defender's clean set S: uint8 images and labels."""
    indices = self.split.clean_set_indices
    return self.dataset.train_images[indices], self.dataset.train_labels[indices]
