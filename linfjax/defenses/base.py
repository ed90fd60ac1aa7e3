"""What every defense shares: its inputs, the record it returns, and its `Defense` entry.

A defense is a function of the backdoored model, its variables, the defender's clean set S,
the defender's trigger and target (the synthetic trigger, or the real one for analysis;
None where it has none) and its settings, returning a `Record`: the defended model as masks
and/or new variables, how many neurons it pruned, what it chose on which data, and, for a
defense that sweeps pruning levels, the curve on S that its choice came from. Only S enters a
choice; the test split is the prune stage's, for reporting.

`Inputs.cache` memoises what several defenses derive from the same inputs (the activation
statistics on S, a model fine-tuned under a given mask); it never changes a result.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from linfjax import models
from linfjax.defenses import pruning
from linfjax.detection import norms


class Bar:
  """A progress bar that shows nothing (the prune stage passes its own)."""

  def update(self, count: int = 1, **kwargs) -> None:
    del count, kwargs

  def close(self) -> None:
    pass


@dataclasses.dataclass
class Inputs:
  """What a defense is given.

  model: the classifier, built with the layers the defenses probe (`layer` among them);
  variables: its variables (never modified);
  images, labels: the defender's clean set S, uint8 [N, H, W, C] and int [N];
  trigger, target, mode: the defender's trigger, the class it sends images to and the
    poisoning mode, or None for a defense without a trigger;
  flagged: whether Neural Cleanse flagged the defender's target class as backdoored (the
    synthetic trigger's file says; True for the real trigger), None when unknown;
  layer: the pruning layer L; seed: the run's seed (each defense folds its own salt of
    linfjax/keys.py); recipe: the training recipe (augmentation, SGD momentum and decay)
    that fine-tuning on S reuses; eval_batch_size: images per evaluation call;
  bar: (description, total, unit) -> a progress bar with update() and close();
  cache: values derived from these inputs, shared by the defenses of a run.
  """
  model: models.LayeredClassifier
  variables: Any
  images: np.ndarray
  labels: np.ndarray
  trigger: Any
  target: int | None
  mode: str
  layer: str
  seed: int
  recipe: Any
  eval_batch_size: int = 500
  flagged: bool | None = None
  bar: Callable[..., Any] = lambda desc, total, unit="batch": Bar()
  cache: dict = dataclasses.field(default_factory=dict)

  @property
  def num_classes(self) -> int:
    return self.model.num_classes

  def statistics(self) -> dict[str, norms.Moments]:
    """Per-neuron moments of every probe layer on S, clean (condition 0) and under the
    defender's trigger (condition 1), for `norms.STATISTICS` (l1, l2, linf, then the signed
    sum; the norms keep their `norms.NORMS` indices); computed once per inputs, in one pass."""
    if "statistics" not in self.cache:
      self.cache["statistics"] = norms.norm_statistics(
          self.model.apply, self.variables, self.images, [self.trigger],
          batch_size=self.eval_batch_size, norms=norms.STATISTICS)
    return self.cache["statistics"]

  def map_size(self, layer: str) -> int:
    """H' * W' of `layer`'s activation maps."""
    return pruning.map_size(self.model, self.variables, self.images.shape[1:], layer)

  def neurons(self, layer: str) -> int:
    """K, the channels of `layer`."""
    return pruning.num_neurons(self.model, self.variables, self.images.shape[1:], layer)

  def clean_set_sweep(self, mask_stacks: dict[str, np.ndarray], *, mask_batch: int,
                      desc: str, variables: Any = None) -> dict[str, np.ndarray]:
    """CA on S and the defender-side ASR under every mask: {'CA_S', 'ASR_defender'} [M], of
    the inputs' model or, when given, of `variables` (a defended model)."""
    bar = self.bar(desc, math.ceil(len(self.labels) / self.eval_batch_size))
    numbers = pruning.sweep(
        self.model.apply, self.variables if variables is None else variables, self.images, self.labels, self.trigger, mask_stacks,
        start=min(mask_stacks, key=models.layer_names(self.model).index), target=self.target,
        mode=self.mode, num_classes=self.num_classes, batch_size=self.eval_batch_size,
        mask_batch=mask_batch, on_batch=lambda: bar.update(1))
    bar.close()
    return {"CA_S": numbers["CA"], "ASR_defender": numbers["ASR"]}


@dataclasses.dataclass
class Curve:
  """The pruning levels a defense swept on S and the one it chose.

  masks: layer -> float32 [M, K] (mask i of every layer together is level i's model);
  pruned: int [M] neurons pruned at each level; fractions: [M] of the layer(s)' neurons;
  clean_set: {'CA_S', 'ASR_defender'} [M]; chosen: the chosen level's index;
  test: whether the report sweeps the test split over the same levels (one layer only).
  """
  masks: dict[str, np.ndarray]
  pruned: np.ndarray
  fractions: np.ndarray
  clean_set: dict[str, np.ndarray]
  chosen: int
  test: bool = True


@dataclasses.dataclass
class Record:
  """A defense's outcome.

  pruned: neurons pruned (results.json's `r_star`); masks: {layer: float32 [K]} channel masks
  of the defended model, or None; variables: its new variables, or None when they are the
  inputs' own; curve: the levels swept on S, for a sweeping defense; details: JSON-able
  values of what it chose and on what data.
  """
  pruned: int
  masks: dict[str, np.ndarray] | None = None
  variables: Any = None
  curve: Curve | None = None
  details: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Work:
  """Sizes a cost estimate needs: images of S and of the test split, classes."""
  clean_set: int
  test: int
  num_classes: int


@dataclasses.dataclass(frozen=True)
class Defense:
  """One defense of `DEFENSES`.

  run: (Inputs, its settings) -> Record;
  from_config: the config's `prune` block -> its typed settings;
  blocks: the `prune.<name>` blocks it declares (name -> Settings class), several entries
    may share one;
  needs_trigger: whether it uses the defender's trigger (a defense that does not can run
    where no trigger was found);
  cost: Work -> estimated image passes (a backward pass counts 2), for the progress bar;
  description: one line for listings and reports;
  layers: (model, the `prune` block) -> the layers it reads beside L (probed on S).
  """
  run: Callable[[Inputs, Any], Record]
  from_config: Callable[[Any], Any]
  needs_trigger: bool
  cost: Callable[[Work], float]
  description: str
  blocks: dict = dataclasses.field(default_factory=dict)
  layers: Callable[[Any, Any], tuple[str, ...]] = lambda model, prune: ()
