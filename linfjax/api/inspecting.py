"""The API's looking inside and defending: Neural Cleanse, detection, activation shifts,
defenses."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import ml_collections
import numpy as np
from jax.typing import ArrayLike

from linfjax import attacks, defenses, keys, models
from linfjax import config as config_lib
from linfjax.api.building import Variables, _block
from linfjax.detection import neural_cleanse, norms, outliers



def _nc_settings(settings) -> neural_cleanse.Settings:
  if settings is None:
    return neural_cleanse.Settings()
  if isinstance(settings, neural_cleanse.Settings):
    return settings
  block = _block(settings, "reverse", "steps")
  neural_cleanse.Settings.check_block(block, "reverse")
  return neural_cleanse.Settings.from_config(block)


def reverse_engineer(model: models.LayeredClassifier, variables: Variables, images: ArrayLike,
                     *, settings: neural_cleanse.Settings | ml_collections.ConfigDict | None = None,
                     seed: int = 0,
                     on_step: Callable[[int, Any, dict], None] | None = None
                     ) -> neural_cleanse.Reversed:
  """Neural Cleanse: the smallest mask-and-pattern trigger that sends S to each class.

  All classes are solved in one vmapped optimisation with the key the `reverse` stage
  uses for this seed, so a run's masks come back.

  Args:
    model, variables: the classifier under suspicion.
    images: the defender's clean set S, uint8 [N, H, W, C].
    settings: `neural_cleanse.Settings`, or a config (or its `reverse` block); None:
      the full-size defaults (`config.make_quick` sets a laptop budget).
    seed: the run's seed.
    on_step: called as `on_step(steps_done, state, means)` after each step; `means` holds
      every class's [K] 'success', 'l1' and 'loss'.

  Returns:
    `Reversed`: masks [K, H, W], patterns [K, H, W, C], `mask_l1` [K] and `succeeded`
    [K] (reached the attack-success threshold); `.trigger(c)` is class c's trigger.
  """
  state = neural_cleanse.solve(model.apply, variables, images, num_classes=model.num_classes,
                               key=keys.run_key(seed, keys.REVERSE),
                               settings=_nc_settings(settings), on_step=on_step)
  return neural_cleanse.result(state)


def detect(reversed_or_norms: neural_cleanse.Reversed | ArrayLike, *,
           succeeded: ArrayLike | None = None, statistic: str | None = None,
           threshold: float | None = None) -> outliers.Detection:
  """Flags the class whose reverse-engineered mask is an outlier below the median.

  Args:
    reversed_or_norms: `reverse_engineer`'s outcome, or the classes' mask l1 norms [K].
    succeeded: [K] bool, the classes whose solve reached the attack-success threshold
      (only they count); taken from a `Reversed`, else all classes.
    statistic: an outlier index of `outliers.STATISTICS`: "nc" (Neural Cleanse's MAD
      index), "log", or "ratio" (median norm / class norm); None: the config's default, "ratio".
    threshold: the index a class must exceed; None: the statistic's default (nc: 2).

  Returns:
    `Detection`: `flagged` (a class or None), `suspect` (the flagged class, else the
    smallest mask that succeeded), and the index of every class.
  """
  if isinstance(reversed_or_norms, neural_cleanse.Reversed):
    mask_norms = reversed_or_norms.mask_l1
    succeeded = reversed_or_norms.succeeded if succeeded is None else succeeded
  else:
    mask_norms = np.asarray(reversed_or_norms)
  if succeeded is None:
    succeeded = np.ones(np.shape(mask_norms), bool)
  statistic = outliers.Settings().statistic if statistic is None else statistic
  return outliers.detect(mask_norms, succeeded, statistic=statistic, threshold=threshold)


@functools.lru_cache(maxsize=None)
def _probing(model: models.LayeredClassifier, layers: tuple[str, ...]) -> models.LayeredClassifier:
  """`model` reporting the activations of `layers`; one object per setting, so its jitted
  functions compile once (modules with equal fields are equal and hash alike)."""
  if tuple(model.probe_layers) == layers:
    return model
  return model.clone(probe_layers=layers)


class LayerShifts(NamedTuple):
  """One layer's activation norms over a set of images, clean and triggered.

  moments: per-neuron running moments; `mean` and `m2` are [2, 3, K] (condition 0
    clean, 1 triggered; norms in `norms.NORMS` order, l1, l2, linf).
  delta: norm -> [K] float64, `mean ||A_k(T(x))||_p - mean ||A_k(x)||_p` per neuron.
  summary: norm -> {'z', 'top1_share', 'rel'}: how far the largest shift stands out
    (z-score), the share of the positive shift on the top 1 % of neurons, and the
    largest shift relative to its neuron's clean norm.
  """
  moments: norms.Moments
  delta: dict[str, np.ndarray]
  summary: dict[str, dict[str, float]]


def activation_shifts(model: models.LayeredClassifier, variables: Variables, images: ArrayLike,
                      trigger: attacks.AnyTrigger, *, layers: Sequence[str] | None = None,
                      batch_size: int = 500) -> dict[str, LayerShifts]:
  """How a trigger moves the l1, l2 and linf norms of every neuron's activation map.

  A neuron's norms are those of its map `A_k` [H', W']: `sum |A_k|`, `sqrt(sum A_k^2)`
  and `max |A_k|`; the paper's observation is that a trigger inflates the linf norm of a
  few neurons far more than the others. One forward pass per batch covers the clean
  and the triggered images.

  Args:
    model, variables: the classifier.
    images: uint8 [N, H, W, C] (S, typically).
    trigger: the trigger whose effect is measured (real or synthetic).
    layers: the layers to measure; None: the model's probe layers (by default its last
      conv map).
    batch_size: images per compiled call.

  Returns:
    layer -> `LayerShifts`.
  """
  layers = tuple(layers or model.probe_layers or (model.default_probe,))
  probing = _probing(model, layers)
  moments = norms.norm_statistics(probing.apply, variables, images, [trigger],
                                  batch_size=batch_size)
  return {layer: LayerShifts(moments[layer],
                             dict(zip(norms.NORMS, norms.shifts(moments[layer])[0])),
                             norms.layer_summary(moments[layer], 0))
          for layer in layers}


def defend(name: str, model: models.LayeredClassifier, variables: Variables,
           clean_images: ArrayLike, clean_labels: ArrayLike, *,
           trigger: attacks.AnyTrigger | None = None, target: int | None = None,
           mode: str = "all_to_one", config: ml_collections.ConfigDict | None = None,
           settings: Any = None, layer: str | None = None) -> defenses.Record:
  """Runs one defense of `defenses.DEFENSES` as the prune stage does, on S only.

  "linf", "l2" and "l1" are the paper's defense: rank layer L's neurons by how much the
  defender's trigger shifts their norm on S, and prune (mask) the top r*, the fewest that
  bring the defender-side ASR on S to `tau` with at most `delta` points of CA lost there.

  Args:
    name: a DEFENSES name ("linf", "l2", "l1", "fine_pruning", "linf_ft", "anp", ...).
    model, variables: the backdoored classifier (never modified).
    clean_images, clean_labels: the defender's clean set S, uint8 [N, H, W, C], int [N].
    trigger, target: the defender's trigger and the class it sends images to (the
      synthetic trigger: `reverse_engineer(...).trigger(c)` and c); needed by the
      defenses that use a trigger.
    mode: the poisoning mode the defender assumes.
    config: a run config (checked first) whose `prune` block (settings, layer L), `train`
      block (fine-tuning's recipe) and seed are used; None: `config.base_config()`.
    settings: the defense's own settings (`defense.from_config(prune_block)` gives them),
      overriding the config's; a `pruning.Settings` with a `layer` sets L.
    layer: L, overriding the settings and config; default the model's last conv map.

  Returns:
    `Record`: `pruned` (r*), `masks` ({layer: [K] in {0, 1}}, or None), `variables` (new
    ones for a defense that fine-tunes, else None), `curve` (the levels swept on S) and
    `details`. Evaluate the defended model with `evaluate(..., masks=record.masks)`.
  """
  if name not in defenses.DEFENSES:
    raise ValueError(f"unknown defense {name!r}; known: {', '.join(defenses.DEFENSES)}")
  defense = defenses.DEFENSES[name]
  if defense.needs_trigger and (trigger is None or target is None):
    raise ValueError(f"defense {name!r} needs the defender's trigger and target")
  if config is None:
    config = config_lib.base_config()
  else:
    config_lib.validate(config)
  values = defense.from_config(config.prune) if settings is None else settings
  layer = layer or getattr(settings, "layer", "") or config.prune.layer or model.default_probe
  layers = tuple(dict.fromkeys((layer, *defense.layers(model, config.prune))))
  inputs = defenses.Inputs(
      model=_probing(model, layers), variables=variables, images=np.asarray(clean_images),
      labels=np.asarray(clean_labels), trigger=trigger, target=target, mode=mode, layer=layer,
      seed=config.seed, recipe=config.train, eval_batch_size=config.train.eval_batch_size)
  return defense.run(inputs, values)
