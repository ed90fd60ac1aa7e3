"""The API's whole runs: `run(config, workdir)` and `load_run(workdir)`."""

from __future__ import annotations

import functools
from typing import NamedTuple

import ml_collections
import numpy as np

from linfjax import attacks, data
from linfjax.api.building import ModelAndVariables
from linfjax.runs import pipeline
from linfjax.runs.stages import reverse as reverse_stage
from linfjax.runs.stages import train as train_stage
from linfjax.runs.stages.context import RunContext


class SyntheticTrigger(NamedTuple):
  """The reverse stage's suspect class, its trigger, and whether Neural Cleanse flagged it."""
  trigger: attacks.Trigger
  target: int
  flagged: bool


class Run:
  """A run directory: its config and results, and, loaded when first asked for, its data,
  trained models and synthetic trigger.

  Attributes:
    workdir: the directory.
    config: the run's config (ConfigDict), as config.json saved it.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, *,
               dataset: data.Dataset | None = None):
    self.workdir = workdir
    self.config = config
    self._dataset = dataset
    self._models: dict[str, ModelAndVariables] = {}

  def __repr__(self) -> str:
    return f"Run({self.workdir!r}, stages done: {sorted(set(self.results) - {'seed'})})"

  @property
  def results(self) -> dict:
    """results.json as it is now ({} before the first stage finished)."""
    return pipeline.read_results(self.workdir) or {}

  @functools.cached_property
  def context(self) -> RunContext:
    """What the stages receive: the data (loaded now), S and the attack's trigger."""
    return pipeline.make_context(self.config, self.workdir, progress=False,
                                 dataset=self._dataset)

  @property
  def dataset(self) -> data.Dataset:
    return self.context.dataset

  @property
  def split(self) -> data.Split:
    return self.context.split

  @property
  def trigger(self) -> attacks.AnyTrigger:
    """The attack's own (real) trigger."""
    return self.context.trigger

  @property
  def clean_set(self) -> tuple[np.ndarray, np.ndarray]:
    """S: uint8 images [|S|, H, W, C] and labels [|S|]."""
    return self.context.clean_set

  def model(self, kind: str = "backdoored") -> ModelAndVariables:
    """The trained `kind` model ('backdoored' or 'vanilla') and its variables, restored
    from the run's final checkpoint.

    Raises:
      CheckpointError: the train stage has not finished that model.
    """
    if kind not in train_stage.MODEL_KINDS:
      raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(train_stage.MODEL_KINDS)}")
    if kind not in self._models:
      self._models[kind] = train_stage.load_trained(self.context, kind)
    return self._models[kind]

  @property
  def backdoored(self) -> ModelAndVariables:
    return self.model("backdoored")

  @property
  def vanilla(self) -> ModelAndVariables:
    return self.model("vanilla")

  @property
  def synthetic_trigger(self) -> SyntheticTrigger | None:
    """The reverse stage's trigger for the suspect class; None when it wrote none (no
    reverse stage yet, or no class reached the attack-success threshold)."""
    loaded = reverse_stage.load_synthetic_trigger(self.workdir, self.dataset.image_shape,
                                                  self.dataset.num_classes)
    return None if loaded is None else SyntheticTrigger(*loaded)


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = False,
        dataset: data.Dataset | None = None) -> Run:
  """Runs the config's stages (train, reverse, analysis, prune) into `workdir`.

  The command line's run (`python -m linfjax.main`): a rerun skips finished stages and
  resumes a killed one; a workdir of another config is refused.

  Args:
    config: a run config; checked before anything is computed.
    workdir: the run directory (created).
    progress: show progress bars.
    dataset: `config.data` already loaded (else loaded here).

  Returns:
    The finished `Run`.
  """
  pipeline.run(config, workdir, progress=progress, dataset=dataset)
  return Run(workdir, config, dataset=dataset)


def load_run(workdir: str, *, dataset: data.Dataset | None = None) -> Run:
  """Opens a run directory written by `run` or `python -m linfjax.main`.

  Args:
    workdir: the run directory.
    dataset: the run's data already loaded; else loaded from `config.data` (relative
      paths from the working directory) when a model or S is first asked for.

  Raises:
    WorkdirError: `workdir` holds no readable config.json.
  """
  return Run(workdir, pipeline.read_config(workdir), dataset=dataset)
