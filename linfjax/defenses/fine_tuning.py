"""Fine-tuning on S: a defense of its own (the control, nothing pruned) and a step after another.

`then_fine_tune(defense)` fine-tunes the model another defense returns, its masks fixed
(`<method>_ft`); the same mask is fine-tuned once per run (`Inputs.cache`), so a model
that two entries share (Fine-Pruning's in both trigger sources) costs one tuning.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from linfjax import keys, settings
from linfjax.defenses.base import Defense, Inputs, Record, Work
from linfjax.settings import integer, number, spec
from linfjax.training import finetune


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The `prune.fine_tune` block: every fine-tuning on S (the control, `_ft` models,
  Fine-Pruning's last step, Neural Cleanse unlearning)."""
  epochs: int = spec(10, integer(1), "Ours, for every fine-tuned model.")
  learning_rate: float = spec(0.01, number(0.0, 10.0, low_open=True),
                              "SGD with the train block's momentum and decay.")
  batch_size: int = spec(32, integer(1), "Ours: S is small (500 images).")


def recipe(inputs: Inputs, values: Settings) -> finetune.Recipe:
  """The SGD and augmentation settings of a tuning on S: these epochs, rate and batch, the
  training recipe's momentum, decay, Nesterov and augmentation."""
  train = inputs.recipe
  return finetune.Recipe(
      epochs=values.epochs, learning_rate=values.learning_rate, momentum=train.momentum,
      weight_decay=train.weight_decay, batch_size=values.batch_size, padding=train.crop_padding,
      flip=bool(train.flip), padding_mode=train.padding_mode, nesterov=bool(train.nesterov))


def tuned(inputs: Inputs, masks: dict[str, np.ndarray], values: Settings):
  """The inputs' model fine-tuned on S under `masks` (fixed); once per mask and run."""
  cache = inputs.cache.setdefault("tuned", {})
  key = tuple((layer, np.asarray(mask).tobytes()) for layer, mask in sorted(masks.items()))
  if key not in cache:
    cache[key] = finetune.fine_tune(inputs.model, inputs.variables, inputs.images,
                                    inputs.labels, masks, recipe(inputs, values),
                                    key=keys.run_key(inputs.seed, keys.FINE_TUNE))
  return cache[key]


def tuning_cost(work: Work, epochs: int = 2) -> float:
  """A tuning's passes (a backward pass counts 2), then its evaluation on both splits."""
  return epochs * work.clean_set * 3.0 + 2.0 * (work.clean_set + work.test)


def _control(inputs: Inputs, values: Settings) -> Record:
  unpruned = {inputs.layer: np.ones(inputs.neurons(inputs.layer), np.float32)}
  return Record(pruned=0, masks=unpruned, variables=tuned(inputs, unpruned, values),
                details={"chosen_on": "S", "epochs": values.epochs})


FINE_TUNING = Defense(
    run=_control, from_config=lambda prune: Settings.from_config(prune.fine_tune),
    needs_trigger=False, cost=tuning_cost, blocks={"fine_tune": Settings},
    description="fine-tuning on S alone, nothing pruned (a control)")


def then_fine_tune(base: Defense, name: str) -> Defense:
  """`base`'s model fine-tuned on S with its masks fixed (the entry `<name>_ft`)."""

  def run(inputs: Inputs, both) -> Record:
    base_values, values = both
    first = inputs.cache.setdefault("records", {}).get(name) or base.run(inputs, base_values)
    masks = first.masks or {inputs.layer: np.ones(inputs.neurons(inputs.layer), np.float32)}
    return Record(pruned=first.pruned, masks=masks, variables=tuned(inputs, masks, values),
                  details={"tuned": name, **{k: v for k, v in first.details.items()
                                             if k != "order"}})

  return Defense(
      run=run, needs_trigger=base.needs_trigger,
      from_config=lambda prune: (base.from_config(prune), Settings.from_config(prune.fine_tune)),
      cost=lambda work: base.cost(work) + tuning_cost(work), blocks={"fine_tune": Settings},
      layers=base.layers,
      description=f"{name}, then fine-tuned on S with its masks fixed")
