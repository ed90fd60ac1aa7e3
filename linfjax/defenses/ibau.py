"""i-BAU: adversarial unlearning of backdoors via the implicit hypergradient.

A min-max on the clean set S, repeated for `rounds` rounds:

  inner (max over one universal perturbation delta [1, H, W, C], in the model's normalised
    input space, so an image x becomes x + std * delta in [0, 1] pixels): delta starts at
    zero and takes one SGD step per batch of S (rate `perturbation_rate`) on
        -CE(f(x + delta), argmax f(x)) + norm_penalty * ||delta||^2,
    then, when `max_norm` > 0, is projected onto the L2 ball of that radius;
  outer (min over the weights theta): per batch of S, Adam (`learning_rate`) steps theta along
    the hypergradient of the outer loss CE(f(x'), y), where x' carries delta on
    floor(batch * portion) randomly chosen images of the batch (none on a last batch too
    small for one, as in the reference: a plain gradient step there). delta is taken as the fixed
    point of Phi(delta, theta) = delta - inner_step * d/d delta [-CE(f(x0 + delta), y0)
    + norm_penalty * ||delta||^2] (x0, y0: the first batch of S), so
        dL/dtheta = d_theta L + (d_theta Phi)^T v,  v = sum_{k<K} (d_delta Phi^T)^k d_delta L,
    the fixed-point (Neumann) series truncated at K = `fixed_point_iterations` terms
    (`hypergradient`, as the reference's `fixed_point`).
Batch norm stays in evaluation mode throughout (the references call model.eval()), so the
running statistics are the backdoored model's; only the parameters change.

Follows Zeng et al., "Adversarial Unlearning of Backdoors via Implicit Hypergradient",
ICLR 2022, as BackdoorBench's defense/i-bau.py and config/defense/i-bau/config.yaml
(SCLBD/BackdoorBench at 3f4b1a9, read) and the authors' defense.py and hypergrad.py
(YiZeng623/I-BAU at 3f4a6e7 and 5ab65bb, read): n_rounds 5, K 5, Adam at 1e-4 (BackdoorBench;
the authors 1e-3) with betas (0.9, 0.999) and no decay, batch 256 (the authors 100), the
perturbation's SGD rate 10, penalty 0.001 and the fixed-point map's step 0.1, the outer loss's
portion 0.01, no clamp of x + delta to the valid range, the unlearning batches drawn once (the
last one smaller when the batch size does not divide S) and the map's loss on the first of
them, with true labels (the ascent uses the model's own, its batches reshuffled every round).
delta lives where BackdoorBench adds it, after the input normalisation (linfjax's models
normalise inside, hence x + std * delta; the authors' defense.py feeds [0, 1] images, no
normalising transform),
so its norms (`details`) are in normalised units.
Differences: the projection onto an L2 ball is an option (`max_norm`; the references'
`pert = batch_pert * min(1, 10 / ||batch_pert||)` is commented out, so the default 0 skips it);
the series runs all K terms (the reference stops early when two iterates differ by < 1e-10);
a batch that would perturb no image is an error (the reference then just fine-tunes); S is
not augmented (BackdoorBench augments its clean loader; the authors do not);
BackdoorBench builds a cosine schedule it never steps, so the rate is constant here too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from linfjax import keys, pixels
from linfjax import settings as settings_lib
from linfjax.defenses.base import Defense, Inputs, Record, Work
from linfjax.settings import fail, integer, number, spec
from linfjax.training import train


@dataclasses.dataclass(frozen=True)
class Settings(settings_lib.Settings):
  """The `prune.ibau` block (defaults: BackdoorBench's config/defense/i-bau/config.yaml)."""
  rounds: int = spec(5, integer(1), "Outer rounds, each a new perturbation (n_rounds 5).")
  fixed_point_iterations: int = spec(
      5, integer(1), "K: terms of the fixed-point series of the implicit hypergradient (5).")
  learning_rate: float = spec(1e-4, number(0.0, 1.0, low_open=True),
                              "Adam's rate for the weights (BackdoorBench 1e-4; authors 1e-3).")
  batch_size: int = spec(256, integer(1), "Images of S per step (BackdoorBench 256).")
  perturbation_rate: float = spec(10.0, number(0.0, 1e4, low_open=True),
                                  "SGD rate of the perturbation's ascent, a step a batch (10).")
  inner_step: float = spec(0.1, number(0.0, 10.0, low_open=True),
                           "Step of the fixed-point map delta - step * grad (0.1).")
  norm_penalty: float = spec(0.001, number(0.0, 1e3),
                             "Weight of ||delta||^2 in the inner loss (0.001).")
  max_norm: float = spec(0.0, number(0.0, 1e6),
                         "L2 radius delta is projected on after its ascent; 0: none (as the "
                         "references, whose projection onto 10 is commented out).")
  portion: float = spec(0.01, number(0.0, 1.0, low_open=True),
                        "Share of a batch carrying delta in the outer loss, floored (0.01).")

  def check(self, prefix: str) -> None:
    if perturbed_count(self.batch_size, self.portion) < 1:
      fail(f"{prefix}.portion", f"{self.portion} of a batch of {self.batch_size} perturbs no "
           "image; raise it or the batch size")


def perturbed_count(batch_size: int, portion: float) -> int:
  """Images of a batch that carry delta in the outer loss: floor(batch * portion)."""
  return int(batch_size * portion + 1e-9)


def hypergradient(outer_loss: Callable, fixed_point_map: Callable, delta: Any, params: Any,
                  iterations: int):
  """The implicit hypergradient of `outer_loss` at a fixed point `delta` of the map.

  outer_loss(delta, params) -> scalar; fixed_point_map(delta, params) -> delta (pytrees).
  Returns (d_params L + (d_params Phi)^T v, v) with v the fixed-point iterate
  v <- (d_delta Phi)^T v + d_delta L from v = 0, `iterations` times: the first `iterations`
  terms of the series for (I - d_delta Phi)^-T d_delta L.
  """
  g_delta, g_params = jax.grad(outer_loss, argnums=(0, 1))(delta, params)
  _, delta_vjp = jax.vjp(lambda d: fixed_point_map(d, params), delta)

  def body(_, v):
    return jax.tree.map(jnp.add, delta_vjp(v)[0], g_delta)

  v = jax.lax.fori_loop(0, iterations, body, jax.tree.map(jnp.zeros_like, g_delta))
  _, params_vjp = jax.vjp(lambda p: fixed_point_map(delta, p), params)
  return jax.tree.map(jnp.add, params_vjp(v)[0], g_params), v


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.lru_cache(maxsize=None)
def _steps(model, values: Settings):
  """The jitted ascent, unlearning and loss functions for one model and settings (called with
  `_stepping`'s settings, so that rounds, batch and radius share one compilation)."""
  std = jnp.asarray(model.std, jnp.float32).reshape(1, 1, 1, -1)

  def logits(params, batch_stats, x):
    return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)[0]

  def penalty(delta):
    return values.norm_penalty * jnp.sum(delta ** 2)

  def ascent(params, batch_stats, delta, x):
    own = jnp.argmax(logits(params, batch_stats, x), axis=1)
    loss = lambda d: -_cross_entropy(logits(params, batch_stats, x + std * d), own) + penalty(d)
    return delta - values.perturbation_rate * jax.grad(loss)(delta)

  def unlearn(params, opt_state, batch_stats, delta, x, y, x0, y0, key):
    chosen = jax.random.permutation(key, x.shape[0])[:perturbed_count(x.shape[0],
                                                                      values.portion)]
    carries = jnp.zeros(x.shape[0]).at[chosen].set(1.0).reshape(-1, 1, 1, 1)

    def inner_loss(d, p):
      return -_cross_entropy(logits(p, batch_stats, x0 + std * d), y0) + penalty(d)

    def fixed_point_map(d, p):
      return d - values.inner_step * jax.grad(inner_loss)(d, p)

    def outer_loss(d, p):
      return _cross_entropy(logits(p, batch_stats, x + carries * std * d), y)

    grads, _ = hypergradient(outer_loss, fixed_point_map, delta, params,
                             values.fixed_point_iterations)
    updates, opt_state = _optimizer(values.learning_rate).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def loss_on(params, batch_stats, delta, x, y):
    return _cross_entropy(logits(params, batch_stats, x + std * delta), y) * x.shape[0]

  return jax.jit(ascent), jax.jit(unlearn, donate_argnums=(0, 1)), jax.jit(loss_on)


@functools.lru_cache(maxsize=None)
def _optimizer(learning_rate: float) -> optax.GradientTransformation:
  return optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8)


def batches(key: jax.Array, num_examples: int, batch_size: int) -> list[np.ndarray]:
  """A shuffled pass over S in batches of `batch_size`, the last one smaller when the size
  does not divide N (as the references' loaders, drop_last False)."""
  order = np.asarray(jax.random.permutation(key, num_examples))
  return [order[i:i + batch_size] for i in range(0, num_examples, batch_size)]


def _stepping(values: Settings) -> Settings:
  """The settings with the fields that no step reads set to their defaults."""
  return dataclasses.replace(values, rounds=Settings.rounds, batch_size=Settings.batch_size,
                             max_norm=Settings.max_norm)


def _mean_loss(loss_on, params, batch_stats, delta, images, labels, batch_size) -> float:
  """Mean cross-entropy on S + delta (every image perturbed), in evaluation batches."""
  total = sum(float(loss_on(params, batch_stats, delta,
                            pixels.to_unit_float(images[i:i + batch_size]),
                            labels[i:i + batch_size]))
              for i in range(0, len(labels), batch_size))
  return total / len(labels)


def _run(inputs: Inputs, values: Settings) -> Record:
  batch_size = min(values.batch_size, len(inputs.labels))
  if perturbed_count(batch_size, values.portion) < 1:
    raise ValueError(f"ibau: portion {values.portion} of a batch of {batch_size} (S has "
                     f"{len(inputs.labels)} images) perturbs no image; raise prune.ibau.portion")
  ascent, unlearn, loss_on = _steps(inputs.model, _stepping(values))
  images = jnp.asarray(inputs.images)
  labels = jnp.asarray(inputs.labels, jnp.int32)
  params = jax.tree.map(jnp.array, inputs.variables["params"])
  batch_stats = inputs.variables.get("batch_stats", {})
  opt_state = _optimizer(values.learning_rate).init(params)
  key = keys.run_key(inputs.seed, keys.IBAU)
  fixed = batches(jax.random.fold_in(key, 0), len(labels), batch_size)
  x0, y0 = pixels.to_unit_float(images[fixed[0]]), labels[fixed[0]]
  mean_loss = lambda p, d: _mean_loss(loss_on, p, batch_stats, d, images, labels,
                                      inputs.eval_batch_size)
  bar = inputs.bar("i-BAU", values.rounds, unit="round")
  norms, before, after = [], [], []
  for round_ in range(values.rounds):
    round_key = jax.random.fold_in(key, round_ + 1)
    delta = jnp.zeros((1,) + tuple(inputs.images.shape[1:]), jnp.float32)
    for rows in batches(jax.random.fold_in(round_key, 0), len(labels), batch_size):
      delta = ascent(params, batch_stats, delta, pixels.to_unit_float(images[rows]))
    norm = float(jnp.linalg.norm(delta))
    if values.max_norm > 0 and norm > values.max_norm:
      delta = delta * (values.max_norm / norm)
    norms.append(min(norm, values.max_norm) if values.max_norm > 0 else norm)
    before.append(mean_loss(params, delta))
    for step, rows in enumerate(fixed):
      params, opt_state = unlearn(params, opt_state, batch_stats, delta,
                                  pixels.to_unit_float(images[rows]), labels[rows], x0, y0,
                                  jax.random.fold_in(round_key, step + 1))
    after.append(mean_loss(params, delta))
    bar.update(1)
  bar.close()
  if not all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params)):
    raise train.TrainingDiverged("i-BAU's weights became non-finite; lower "
                                 "prune.ibau.learning_rate")
  return Record(pruned=0, variables={"params": params, "batch_stats": batch_stats},
                details={"chosen_on": "S", "rounds": values.rounds,
                         "fixed_point_iterations": values.fixed_point_iterations,
                         "delta_norms": norms, "final_delta_norm": norms[-1],
                         "loss_before": before, "loss_after": after,
                         "batches_per_round": len(fixed)})


def _cost(work: Work) -> float:
  """Default settings: per round an ascent pass over S (a forward for the labels, one forward
  and backward), the unlearning (the outer gradient, then K + 1 second-order products on a
  batch, about 5 passes each) and two losses on S; then the evaluation on both splits."""
  return 5 * work.clean_set * (4.0 + 3.0 + 5.0 * 6 + 2.0) + 2.0 * (work.clean_set + work.test)


IBAU = Defense(
    run=_run, needs_trigger=False, from_config=lambda prune: Settings.from_config(prune.ibau),
    cost=_cost, blocks={"ibau": Settings},
    description="i-BAU: unlearning on S against a universal perturbation, the weights stepped "
                "along the implicit hypergradient")
