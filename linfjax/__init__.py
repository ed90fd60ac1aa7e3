"""linfjax: backdoored and vanilla classifiers, their activation norms, and linf-based pruning.

The API (linfjax/api/), one function per step of the paper's pipeline:
  load_dataset(config)                      the config's data: uint8 images, int labels
  clean_set(dataset, size=, seed=)          the defender's clean set S, held out of training
  make_attack("patch", image_shape)         a trigger ("patch", "blend", "sig", "wanet")
  poison(config, dataset, split, trigger)   the poisoned training set a run trains on
  train(config, dataset, split, trigger)    (model, variables), backdoored or vanilla
  evaluate(model, variables, dataset, trigger, target=)   {'CA', 'ASR', 'RA'} in percent
  reverse_engineer(model, variables, s_images, settings=, seed=)   Neural Cleanse per class
  detect(reversed)                          the flagged class (or None) and the suspect
  activation_shifts(model, variables, images, trigger)    l1/l2/linf shifts per layer
  defend("linf", model, variables, s_images, s_labels, trigger=, target=)   pruning masks
  run(config, workdir), load_run(workdir)   the whole pipeline into a run directory, and back
Each uses the stages' own code and random streams, so the API and a run agree;
examples/paper_pipeline.py runs the paper through it. Configs: `linfjax.config`
(`base_config()`, `make_quick(...)`); `python -m linfjax.config` lists every field.

Packages, data flowing one way: data -> attacks -> models -> training -> detection ->
defenses -> reports, with runs/ (pipeline, stages, grids) driving them and `main` the
command line. The API is imported on first use, so `python -m linfjax.main --help` and
`import linfjax` load no JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Every name the API exports; `linfjax.<name>` imports linfjax.api the first time.
_API = (
    "LayerShifts", "Run", "SyntheticTrigger", "activation_shifts", "clean_set", "defend",
    "detect", "evaluate", "load_dataset", "load_run", "make_attack", "poison",
    "reverse_engineer", "run", "train",
)

if TYPE_CHECKING:
  from linfjax.api import (LayerShifts, Run, SyntheticTrigger, activation_shifts, clean_set,
                           defend, detect, evaluate, load_dataset, load_run, make_attack,
                           poison, reverse_engineer, run, train)


def __getattr__(name: str):
  """PEP 562: the API's names, imported from linfjax.api on first use."""
  if name in _API:
    value = getattr(importlib.import_module("linfjax.api"), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'linfjax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted({*globals(), *_API})


__all__ = [*_API, "__version__"]
