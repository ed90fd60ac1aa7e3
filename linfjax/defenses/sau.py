"""SAU: Shared Adversarial Unlearning.

Every batch of S first gets a perturbation `d` (L_inf ball of radius `eps`, in [0, 1] pixels)
by PGD against two models at once: the model being defended `f` and the backdoored model as
it came, `f0` (frozen). An example is *shared* adversarial when `d` flips both models away
from their own clean predictions and to the same class. PGD starts at `d = +eps`, and for
`steps` steps moves `d <- clip(d - step_size * sign(grad_d L_pgd), -eps, eps)` with

    L_pgd = -beta_adv / (2B) * (sum over examples f does not yet flip of CE(f(x+d), y)
                                + the same for f0)
            + beta_shared / B * sum over non-shared examples of JS(f(x+d), f0(x+d))

(JS of the two softmaxes, probabilities clamped at 1e-8), stopping early once every example
is shared. Then `f`'s weights take one step on

    L = lambda_clean * CE(f(x), y) + lambda_adv * CE(f(x+d), y)
        + lambda_shared / (2B) * sum over P of [-log(1e-6 + min(1 - p_k, 0.999))
                                                -log(1 + 1e-6 - max(p_k, 0.001))]

where k is f0's prediction on x+d, p_k is f's probability of k on x+d and P the examples
whose k is neither the label nor f0's clean prediction: f unlearns the wrong class that the
backdoored model would give them. Both models run batch norm in evaluation mode (the
reference's default `train_mode=False`), so the batch statistics are the backdoored model's.

Follows Wei et al., "Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared
Adversarial Examples", NeurIPS 2023, as BackdoorBench's defense/sau.py (its `Shared_PGD` and
`mitigation`; SCLBD/BackdoorBench at 3f4b1a9, read for this port) with
config/defense/sau/config.yaml (at a7cc9b7): norm_type L_inf, trigger_norm 0.2, adv_lr 0.2,
adv_steps 5, pgd_init 'max', beta_1 0.01, beta_2 1, lmd_1 1, lmd_2 0, lmd_3 1, outer_steps 1,
no augmentation, the perturbed images not clipped to [0, 1] (as there).
Differences: the optimizer and its length are `prune.fine_tune`'s (SGD with the training
recipe's momentum and decay, cosine schedule; the reference: Adam at lr 1e-4, weight decay 0,
cosine, 100 rounds over 5 % of the training set, batch 256), so the quick setting tunes for
that block's epochs; only the L_inf ball with the 'max' start is implemented (the reference
also has L1/L2/'Reg' and zero/random/min starts). PGD's early stop is the reference's (after
the step in which every example was shared), written as a flag that freezes `d` in a jitted
loop.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from linfjax import keys
from linfjax import settings as settings_lib
from linfjax.defenses import fine_tuning
from linfjax.training import finetune
from linfjax.defenses.base import Defense, Inputs, Record
from linfjax.settings import fail, integer, number, spec


@dataclasses.dataclass(frozen=True)
class Settings(settings_lib.Settings):
  """The `prune.sau` block (its epochs, rate and batch: `prune.fine_tune`'s)."""
  eps: float = spec(0.2, number(0.0, 1.0, low_open=True),
                    "L_inf radius of the perturbation in [0, 1] pixels (SAU's trigger_norm).")
  steps: int = spec(5, integer(1), "PGD steps per batch (SAU's adv_steps).")
  step_size: float = spec(0.2, number(0.0, 1.0, low_open=True),
                          "PGD's step on the gradient's sign (SAU's adv_lr).")
  beta_adv: float = spec(0.01, number(0.0, 1e6),
                         "PGD: weight of the cross-entropy of unflipped examples (beta_1).")
  beta_shared: float = spec(1.0, number(0.0, 1e6),
                            "PGD: weight of the two models' JS divergence (beta_2).")
  lambda_clean: float = spec(1.0, number(0.0, 1e6), "Unlearning: clean cross-entropy (lmd_1).")
  lambda_adv: float = spec(0.0, number(0.0, 1e6),
                           "Unlearning: cross-entropy on the perturbed images (lmd_2).")
  lambda_shared: float = spec(1.0, number(0.0, 1e6),
                              "Unlearning: the shared adversarial risk (lmd_3).")

  def check(self, prefix: str) -> None:
    if self.lambda_clean + self.lambda_adv + self.lambda_shared == 0:
      fail(f"{prefix}.lambda_shared",
           "lambda_clean, lambda_adv and lambda_shared are all 0: nothing to minimise")


def js_divergence(logits: jax.Array, logits_ref: jax.Array) -> jax.Array:
  """[B] Jensen-Shannon divergence of the two softmaxes (probabilities clamped at 1e-8)."""
  p = jnp.maximum(jax.nn.softmax(logits), 1e-8)
  q = jnp.maximum(jax.nn.softmax(logits_ref), 1e-8)
  log_m = jnp.log(0.5 * (p + q))
  return jnp.sum(0.5 * (p * jnp.log(p) + q * jnp.log(q)) - 0.5 * (p + q) * log_m, axis=1)


def pgd_loss(logits, logits_ref, clean_pred, clean_pred_ref, labels, beta_adv: float,
             beta_shared: float):
  """The PGD objective on the perturbed images' logits (the step descends it).

  Returns (loss, shared [B] bool: both models flipped from their clean predictions, to the
  same class)."""
  pred, pred_ref = jnp.argmax(logits, axis=1), jnp.argmax(logits_ref, axis=1)
  flipped, flipped_ref = pred != clean_pred, pred_ref != clean_pred_ref
  shared = flipped & flipped_ref & (pred == pred_ref)
  batch = labels.shape[0]
  ce = optax.softmax_cross_entropy_with_integer_labels
  adv = (jnp.sum(jnp.where(flipped, 0.0, ce(logits, labels)))
         + jnp.sum(jnp.where(flipped_ref, 0.0, ce(logits_ref, labels))))
  adv = -adv / 2 / batch
  js = jnp.sum(jnp.where(shared, 0.0, js_divergence(logits, logits_ref))) / batch
  return beta_adv * adv + beta_shared * js, shared


def shared_pgd(logits_fn: Callable, variables, variables_ref, x: jax.Array, labels: jax.Array,
               values: Settings, clean_pred_ref: jax.Array | None = None) -> jax.Array:
  """The shared adversarial perturbation [B, H, W, C] of images x in [0, 1].

  logits_fn(variables, images) -> logits; the gradient flows to the perturbation only.
  clean_pred_ref: the reference model's predictions on x, when the caller has them."""
  clean_pred = jnp.argmax(logits_fn(variables, x), axis=1)
  if clean_pred_ref is None:
    clean_pred_ref = jnp.argmax(logits_fn(variables_ref, x), axis=1)

  def objective(delta):
    return pgd_loss(logits_fn(variables, x + delta), logits_fn(variables_ref, x + delta),
                    clean_pred, clean_pred_ref, labels, values.beta_adv, values.beta_shared)

  def step(_, carry):
    delta, done = carry
    grad, shared = jax.grad(objective, has_aux=True)(delta)
    moved = jnp.clip(delta - values.step_size * jnp.sign(grad), -values.eps, values.eps)
    return jnp.where(done, delta, moved), done | jnp.all(shared)

  start = jnp.full_like(x, values.eps)  # 'max' start: +eps everywhere.
  delta, _ = jax.lax.fori_loop(0, values.steps, step, (start, jnp.array(False)))
  return jax.lax.stop_gradient(delta)


def unlearning_loss(logits, adv_logits, adv_logits_ref, clean_pred_ref, labels,
                    values: Settings) -> jax.Array:
  """SAU's outer loss from the defended model's clean and perturbed logits and the backdoored
  model's perturbed logits and clean predictions."""
  ce = optax.softmax_cross_entropy_with_integer_labels
  target_ref = jnp.argmax(adv_logits_ref, axis=1)
  poison = (target_ref != labels) & (target_ref != clean_pred_ref)
  probs = jax.nn.softmax(adv_logits)
  one_hot = jax.nn.one_hot(target_ref, probs.shape[1])
  pos = jnp.sum(probs * one_hot, axis=1)
  neg = jnp.sum(probs * (1 - one_hot), axis=1)
  terms = (-jnp.log(1e-6 + jnp.minimum(neg, 0.999))
           - jnp.log(1 + 1e-6 - jnp.maximum(pos, 0.001)))
  shared = jnp.sum(jnp.where(poison, terms, 0.0)) / 2 / labels.shape[0]
  return (values.lambda_clean * ce(logits, labels).mean()
          + values.lambda_adv * ce(adv_logits, labels).mean() + values.lambda_shared * shared)


@functools.lru_cache(maxsize=None)
def sau_step(values: Settings) -> Callable:
  """The step loss of `finetune.tune` for SAU (extra: the backdoored model's variables)."""
  def step_loss(state, x, y, reference):
    logits_fn = lambda variables, images: state.apply_fn(variables, images, train=False)[0]
    current = {"params": state.params, "batch_stats": state.batch_stats}
    clean_pred_ref = jnp.argmax(logits_fn(reference, x), axis=1)
    adv = x + shared_pgd(logits_fn, current, reference, x, y, values, clean_pred_ref)
    adv_logits_ref = logits_fn(reference, adv)

    def loss_fn(params):
      both = logits_fn({"params": params, "batch_stats": state.batch_stats},
                       jnp.concatenate([x, adv]))
      logits, adv_logits = jnp.split(both, 2)
      return unlearning_loss(logits, adv_logits, adv_logits_ref, clean_pred_ref, y, values)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return loss, state.batch_stats, grads
  return step_loss


def _run(inputs: Inputs, both) -> Record:
  values, tuning = both
  recipe = dataclasses.replace(fine_tuning.recipe(inputs, tuning), padding=0, flip=False)
  reference = jax.tree.map(jnp.asarray, inputs.variables)
  defended = finetune.tune(inputs.model, inputs.variables, inputs.images, inputs.labels,
                           recipe, sau_step(values), key=keys.run_key(inputs.seed, keys.SAU),
                           extra=reference)
  return Record(pruned=0, variables=defended,
                details={"chosen_on": "S", "epochs": tuning.epochs,
                         **dataclasses.asdict(values)})


SAU = Defense(
    run=_run, needs_trigger=False,
    from_config=lambda prune: (Settings.from_config(prune.sau),
                               fine_tuning.Settings.from_config(prune.fine_tune)),
    # Per image and step (a backward pass counts 2): both models' clean predictions (2), 5
    # PGD steps through both (5 * 6), the reference on x+d (1), the defended model on x and
    # x+d (6): 39 passes, against fine-tuning's 3 (counted in tuning_cost).
    cost=lambda work: fine_tuning.tuning_cost(work) + 2 * work.clean_set * 36.0,
    blocks={"sau": Settings, "fine_tune": fine_tuning.Settings},
    description="SAU: fine-tuning on S that unlearns shared adversarial examples of the "
                "model and the backdoored one")
