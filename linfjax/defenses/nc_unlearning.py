"""Neural Cleanse unlearning: fine-tune on S with a share of it stamped, labels kept.

Neural Cleanse's mitigation by unlearning: from the defender's clean data, a share
(20 %) of the images carry the reverse-engineered (synthetic) trigger but keep their true
labels, and the model is fine-tuned on the whole set, so it learns that the trigger does
not mean the target class.

Where it follows which reference (checked against BackdoorBench's defense/nc.py and
config/defense/nc/config.yaml at f02e353; the authors' github.com/bolunwang/backdoor at
e857774 ships detection, mad_outlier_detection.py, and no unlearning code):
  - The share: `unlearning_ratio` 0.2 of the clean data, stamped images replacing their
    clean copies, true labels kept: as BackdoorBench (which stamps the last
    `N - int(0.8 N)` of a random 5 % of the training set; linfjax a seeded `round(0.2 N)`
    of S).
  - When Neural Cleanse flagged no class, BackdoorBench returns the model unchanged.
    `prune.nc_unlearning.only_flagged=True` does the same (the Record's details say so;
    it needs `Inputs.flagged`); the default False unlearns with the most suspicious class's
    trigger whether or not it was flagged (linfjax's realistic path).
Differences kept: with several flagged classes BackdoorBench adds one stamped copy of the
share per class, linfjax unlearns the one suspect class's trigger; BackdoorBench stamps
before augmentation, with the mask and `mask * pattern` as saved to PNG (min-max
normalised), linfjax after augmentation with the trigger itself (as it stamps poisoned
examples in training); the fine-tuning is `prune.fine_tune`'s (BackdoorBench: 100 epochs,
SGD lr 0.01 with cosine decay, batch 256, weight decay 5e-4).

References:
  Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
  Networks", IEEE S&P 2019.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from linfjax import attacks, keys, models
from linfjax import settings as settings_lib
from linfjax.attacks import poison
from linfjax.defenses import fine_tuning
from linfjax.defenses.base import Defense, Inputs, Record
from linfjax.settings import boolean, number, spec
from linfjax.training import finetune, train

SHARE = 0.2  # Share of S stamped with the synthetic trigger (NC; BackdoorBench's 0.2).


def unlearning_set(images: np.ndarray, labels: np.ndarray, *, share: float,
                   seed: int) -> poison.PoisonedSet:
  """S with `round(share * N)` examples (seeded) flagged for stamping, every label kept."""
  count = poison.poison_count(len(labels), share)
  if not 0 < count <= len(labels):
    raise ValueError(f"unlearning share {share} of {len(labels)} images stamps {count}; "
                     "it must stamp at least one image and at most all")
  chosen = np.sort(keys.numpy_rng(seed, keys.UNLEARNING_STAMPS).choice(len(labels), count, replace=False))
  stamp = np.zeros(len(labels), bool)
  stamp[chosen] = True
  return poison.PoisonedSet(np.asarray(images), np.asarray(labels, np.int32), stamp,
                            chosen.astype(np.int64), np.zeros(len(labels), bool),
                            np.zeros(0, np.int64))


def unlearn(model: models.LayeredClassifier, variables, images: np.ndarray, labels: np.ndarray,
            trigger: attacks.AnyTrigger, recipe: finetune.Recipe, *, key: jax.Array,
            share: float = SHARE) -> dict:
  """Fine-tunes the backdoored model on S with the unlearning stamps; returns new variables.

  Args:
    model: the classifier; variables: its variables (not modified).
    images: S, uint8 [N, H, W, C]; labels: [N] int, their true labels.
    trigger: the synthetic trigger (Neural Cleanse's reverse-engineered mask and pattern).
    recipe: epochs, SGD and augmentation settings (those of fine-tuning).
    key: draws the stamped examples (`fold_in(key, 0)`'s seed), shuffles and augments.
    share: the share of S stamped with the trigger.

  Raises:
    train.TrainingDiverged: when the loss is not finite.
  """
  seed = int(jax.random.randint(jax.random.fold_in(key, 0), (), 0, 2**31 - 1))
  data = train.to_device(unlearning_set(images, labels, share=share, seed=seed))
  batch_size = min(recipe.batch_size, len(labels))
  total_steps = recipe.epochs * train.steps_per_epoch(len(labels), batch_size)
  state = train.create_state(model, jax.tree.map(jnp.array, variables),  # The step donates.
                             train.make_optimizer(recipe, total_steps))
  state = train.fit(state, data, trigger,
                    train.Recipe(recipe.epochs, batch_size, recipe.padding, recipe.flip,
                                 recipe.padding_mode),
                    key=jax.random.fold_in(key, 1))
  return train.variables(state)


@dataclasses.dataclass(frozen=True)
class Settings(settings_lib.Settings):
  """The `prune.nc_unlearning` block (its epochs, rate and batch: `prune.fine_tune`'s)."""
  share: float = spec(SHARE, number(0.0, 1.0, low_open=True),
                      "The share of S stamped with the synthetic trigger (NC's 0.2).")
  only_flagged: bool = spec(False, boolean(),
                            "True: unlearn only when Neural Cleanse flagged the class, else "
                            "keep the model (BackdoorBench nc.py); False: always (ours).")


NOT_FLAGGED = "Neural Cleanse flagged no class: model unchanged (only_flagged, as BackdoorBench)"


def _run(inputs: Inputs, both) -> Record:
  values, tuning = both
  details = {"share": values.share, "only_flagged": values.only_flagged,
             "flagged": inputs.flagged, "chosen_on": "S"}
  if values.only_flagged:
    if inputs.flagged is None:
      raise ValueError("nc_unlearning with only_flagged needs Inputs.flagged (whether Neural "
                       "Cleanse flagged the class); it is None")
    if not inputs.flagged:
      return Record(pruned=0, details={**details, "unlearned": False, "reason": NOT_FLAGGED})
  defended = unlearn(inputs.model, inputs.variables, inputs.images, inputs.labels,
                     inputs.trigger, fine_tuning.recipe(inputs, tuning),
                     key=keys.run_key(inputs.seed, keys.NC_UNLEARNING), share=values.share)
  return Record(pruned=0, variables=defended, details={**details, "unlearned": True})


NC_UNLEARNING = Defense(
    run=_run, needs_trigger=True,
    from_config=lambda prune: (Settings.from_config(prune.nc_unlearning),
                               fine_tuning.Settings.from_config(prune.fine_tune)),
    cost=lambda work: fine_tuning.tuning_cost(work), blocks={"nc_unlearning": Settings,
                                                            "fine_tune": fine_tuning.Settings},
    description="Neural Cleanse unlearning: fine-tuning on S with a share stamped with the "
                "synthetic trigger, true labels kept")
