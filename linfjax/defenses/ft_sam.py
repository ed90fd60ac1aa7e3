"""FT-SAM: fine-tuning on S with Sharpness-Aware Minimisation.

Each step perturbs the weights towards higher loss, `e = rho * g / ||g||` (g: the batch's
gradient, ||.|| the global L2 norm over all parameters), takes the gradient at `w + e`, and
steps the original weights `w` with it (SGD with the fine-tuning recipe's momentum, coupled
decay and cosine schedule). The idea: minima the backdoor lives in are sharp, so a flat
minimum of the clean loss forgets it.

Follows Zhu et al., "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware
Minimization", ICCV 2023, as BackdoorBench's defense/ft-sam.py (SCLBD/BackdoorBench at
f02e353; not checked line by line here): fine-tuning on the clean data with a SAM
optimizer wrapping SGD.
Differences: the plain (non-adaptive) SAM perturbation, `rho` default 0.05 (Foret et al.'s;
BackdoorBench's config sets its own rho, and the paper's adaptive variant scales `e` by |w|);
batch-norm statistics are updated from the first (unperturbed) pass only; epochs, rate and
batch are `prune.fine_tune`'s (BackdoorBench: 100 epochs at lr 0.01 on 5 % of the training
set), so the quick setting tunes for that block's epochs.

The loop over S is `training.finetune.tune`'s; this module gives it SAM's step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import optax

from linfjax import keys
from linfjax import settings as settings_lib
from linfjax.defenses import fine_tuning
from linfjax.defenses.base import Defense, Inputs, Record
from linfjax.settings import number, spec
from linfjax.training import finetune


@dataclasses.dataclass(frozen=True)
class Settings(settings_lib.Settings):
  """The `prune.ft_sam` block (its epochs, rate and batch: `prune.fine_tune`'s)."""
  rho: float = spec(0.05, number(0.0, 10.0, low_open=True),
                    "SAM's radius: the weights move rho * g / ||g|| before the gradient.")


def sam_gradient(loss_fn: Callable, params, rho: float):
  """SAM's gradient: `loss_fn`'s gradient at `params + rho * g / ||g||`, g at `params`.

  `loss_fn(params) -> (loss, aux)`; returns (loss at params, aux at params, the gradient)."""
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  norm = optax.tree.norm(grads)
  scale = rho / (norm + 1e-12)
  perturbed = jax.tree.map(lambda w, g: w + scale * g, params, grads)
  (_, _), sharp = jax.value_and_grad(loss_fn, has_aux=True)(perturbed)
  return loss, aux, sharp


@functools.lru_cache(maxsize=None)
def sam_step(rho: float) -> Callable:
  """The step loss of `finetune.tune` for SAM with radius rho (one object per rho: one compile)."""
  def step_loss(state, x, y, extra):
    del extra
    loss, batch_stats, grads = sam_gradient(finetune.cross_entropy(state, x, y),
                                             state.params, rho)
    return loss, batch_stats, grads
  return step_loss


def _run(inputs: Inputs, both) -> Record:
  values, tuning = both
  defended = finetune.tune(inputs.model, inputs.variables, inputs.images, inputs.labels,
                           fine_tuning.recipe(inputs, tuning), sam_step(values.rho),
                           key=keys.run_key(inputs.seed, keys.FT_SAM))
  return Record(pruned=0, variables=defended,
                details={"chosen_on": "S", "rho": values.rho, "epochs": tuning.epochs})


FT_SAM = Defense(
    run=_run, needs_trigger=False,
    from_config=lambda prune: (Settings.from_config(prune.ft_sam),
                               fine_tuning.Settings.from_config(prune.fine_tune)),
    cost=lambda work: 2 * fine_tuning.tuning_cost(work),
    blocks={"ft_sam": Settings, "fine_tune": fine_tuning.Settings},
    description="FT-SAM: fine-tuning on S with sharpness-aware minimisation (two passes a step)")
