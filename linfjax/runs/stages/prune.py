"""The `prune` stage: the lp-based pruning defense, its extensions and baselines.

For each trigger source the defender's trigger `T^` and target are
  - "synthetic": the reverse stage's suspect class and its trigger (the realistic setting),
    whether or not Neural Cleanse flagged it (results.json's `reverse.flagged` says);
  - "real": the attack's own trigger and label (analysis only).
On the defender's clean set S every method ranks neurons and one sweep per split evaluates
every (method, level) mask (`linfjax.defenses.pruning`): on the test split CA and ASR under the real
trigger, on S the CA and the ASR under `T^` (the defender's view). Only S numbers choose a
level; the test split is for reporting. The methods (results keys):
  - `linf`, `l2`, `l1`: the paper's defense, layer L ranked by the shift under that norm,
    r* by METHOD.md's rule; with `prune.fine_tune`, also `<norm>_ft` (synthetic source
    only, as the two rows below): the same pruned model fine-tuned on S, mask fixed;
  - `<norm>_layers` (ours, beyond the paper; `prune.multi_layer`): the same norm over several
    layers at once, ranked per layer or jointly by relative shift, r* by the same rule on S
    (the sweep runs on S only; the test split at r*), and `<norm>_layers_ft`;
  - `fine_pruning` (Liu et al.): layer L's least-active neurons, pruned until the CA drop on
    S exceeds `delta` (`prune.fine_pruning_level="ca_drop"`, no trigger needed), then
    fine-tuned; "defender_asr" picks its level by the lp rule instead;
  - `fine_tuning`: a control, the unpruned model fine-tuned on S alike;
  - the baselines of `prune.baselines` (linfjax/baselines/), synthetic source only: `anp`
    (batch-norm masks learned on S, pruned below a threshold), `clp` (data-free channel
    Lipschitz bounds) and `nc_unlearning` (fine-tuning on S with a share stamped with the
    synthetic trigger, true labels kept); `r_star` is the number of neurons they prune.
The real trigger, an analysis-only reference, gets the paper's rows and Fine-Pruning.

Writes under `WORKDIR/prune/`:
  sweep_<source>.json  rankings, the sweeps' per-level numbers and the fine-tuned models'
                       numbers; a rerun after a kill reuses what it holds (same inputs only);
  sweep_<source>.csv   one row per (method, level), r* marked;
  curves_<source>.png, curves_<source>_layers.png  CA and ASR against the pruning level.
Returns results.json's `prune` entry (METHOD.md, "Results file"): per source, per method,
`r_star` (neurons pruned), CA, ASR_real, ASR_defender, dCA, dASR and DER, relative to the
backdoored model before the defense on the test split.

References:
  Xu et al., "Defending against Backdoor Attack on Deep Neural Networks", arXiv
  2002.12162. Liu et al., "Fine-Pruning: Defending Against Backdooring Attacks on Deep
  Neural Networks", RAID 2018.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from linfjax import config as config_lib
from linfjax.reports import figures
from linfjax import files
from linfjax.training import finetune
from linfjax import models
from linfjax.detection import norms
from linfjax.defenses import pruning as prune
from linfjax.attacks import triggers
from linfjax.defenses import anp, clp, nc_unlearning as unlearning
from linfjax.runs.stages import reverse as reverse_stage
from linfjax.runs.stages import train as train_stage
from linfjax.runs.stages.context import RunContext

STAGE = "prune"
SOURCES = ("synthetic", "real")
NO_SYNTHETIC_TRIGGER = "no class of the backdoored model reached the attack-success threshold"
NO_REVERSE_STAGE = "the reverse stage is not in config.stages"
# Salt of the fine-tuning key (train uses 0 and 1, reverse 2), and of the baselines' keys.
KEY_SALT = 3
BASELINE_SALTS = {"anp": 4, "nc_unlearning": 5}
SWEEP_KEYS = ("CA", "ASR_real", "RA_real", "CA_S", "ASR_defender")
CLEAN_SET_KEYS = ("CA_S", "ASR_defender")
FINE_TUNING = "fine_tuning"
# The source the extensions beyond the paper run for (fine-tuned rows, several layers, the
# fine-tuning control): the realistic one. The real trigger gets the paper's rows and
# Fine-Pruning, its analysis-only reference.
EXTENDED_SOURCE = "synthetic"
TUNED_SUFFIX = "_ft"
LAYERS_SUFFIX = "_layers"


@dataclasses.dataclass(frozen=True)
class Defender:
  """The trigger the defender prunes against, the class it sends images to, and the mode."""
  trigger: triggers.Trigger
  target: int
  mode: str


def _defender(ctx: RunContext, source: str) -> Defender | str:
  """What the defender uses for `source`, or the reason the source is skipped."""
  if source == "real":
    return Defender(ctx.trigger, ctx.config.poison.target, ctx.config.poison.mode)
  if "reverse" not in ctx.config.stages:
    return NO_REVERSE_STAGE
  loaded = reverse_stage.load_synthetic_trigger(ctx.workdir, ctx.dataset.image_shape,
                                                ctx.dataset.num_classes)
  if loaded is None:
    return NO_SYNTHETIC_TRIGGER
  trigger, target, _ = loaded
  return Defender(trigger, target, "all_to_one")


def _digest(*trees) -> str:
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(trees):
    digest.update(np.asarray(leaf, np.float32).tobytes())
  return digest.hexdigest()


def _fingerprint(ctx: RunContext, variables, layer: str, defender: Defender) -> str:
  """What a saved sweep was computed from (model weights included); a mismatch means
  recompute."""
  return json.dumps({"layer": layer, "weights": _digest(variables),
                     "trigger": _digest(tuple(defender.trigger)), "target": defender.target,
                     "prune": json.loads(ctx.config.prune.to_json()),
                     "train": json.loads(ctx.config.train.to_json()),
                     "clean_set": ctx.split.clean_set_indices.tolist(),
                     "test": len(ctx.dataset.test_labels)}, sort_keys=True)


class _Evaluator:
  """Evaluates stacks of masks {layer: [M, K]} on the test split and on S for one source."""

  def __init__(self, ctx: RunContext, model, defender: Defender):
    self.ctx, self.apply_fn, self.defender = ctx, model.apply, defender
    self.order = models.layer_names(model)

  def __call__(self, variables, mask_stacks, desc: str, *, test: bool = True,
               mask_batch: int | None = None) -> dict[str, np.ndarray]:
    cfg, ctx = self.ctx.config, self.ctx
    batch_size = cfg.train.eval_batch_size
    s_images, s_labels = ctx.clean_set
    splits = [(s_images, s_labels)] + ([(ctx.dataset.test_images, ctx.dataset.test_labels)]
                                       if test else [])
    bar = ctx.progress.bar(desc, sum(math.ceil(len(labels) / batch_size) for _, labels in splits),
                           part=0.0, unit="batch")
    common = dict(start=min(mask_stacks, key=self.order.index),
                  num_classes=ctx.dataset.num_classes, batch_size=batch_size,
                  mask_batch=mask_batch or cfg.prune.mask_batch, on_batch=lambda: bar.update(1))
    defender = prune.sweep(self.apply_fn, variables, s_images, s_labels, self.defender.trigger,
                           mask_stacks, target=self.defender.target, mode=self.defender.mode,
                           **common)
    numbers = {"CA_S": defender["CA"], "ASR_defender": defender["ASR"]}
    if test:
      real = prune.sweep(self.apply_fn, variables, ctx.dataset.test_images,
                         ctx.dataset.test_labels, ctx.trigger, mask_stacks,
                         target=cfg.poison.target, mode=cfg.poison.mode, **common)
      numbers.update(CA=real["CA"], ASR_real=real["ASR"], RA_real=real["RA"])
    bar.close()
    return numbers


def _multi_layer_scores(ctx: RunContext, statistics: dict[str, norms.Moments], norm: str):
  ranking = ctx.config.prune.multi_layer
  score = (prune.relative_shifts if ranking == "joint" else
           lambda moments, norm: prune.scores_from_moments(moments, norm=norm,
                                                           score=ctx.config.prune.score))
  return {layer: score(moments, norm=norm) for layer, moments in statistics.items()}


def _sweep(ctx, source, model, variables, layer, multi_layers, defender, evaluate) -> dict:
  """The source's saved record when its inputs match, else the sweeps, computed and saved."""
  path = os.path.join(ctx.stage_dir(STAGE), f"sweep_{source}.json")
  fingerprint = _fingerprint(ctx, variables, layer, defender)
  if os.path.exists(path):
    with open(path) as f:
      record = json.load(f)
    if record.get("fingerprint") == fingerprint:
      logging.info("prune/%s: sweep finished earlier, loaded %s", source, path)
      return record
    logging.info("prune/%s: %s was computed from other inputs; recomputing", source, path)
  cfg = ctx.config.prune
  started = time.perf_counter()
  s_images, _ = ctx.clean_set
  statistics = norms.norm_statistics(model.apply, variables, s_images, [defender.trigger],
                                     batch_size=ctx.config.train.eval_batch_size)
  moments = statistics[layer]
  map_size = _map_size(ctx, model, variables, layer)
  orders = prune.method_rankings(moments, norm_list=tuple(cfg.norms), score=cfg.score,
                                 map_size=map_size, fine_pruning=cfg.fine_pruning)
  counts = prune.level_counts(tuple(cfg.levels), moments.mean.shape[-1], unit=cfg.level_unit)
  results = evaluate(variables, {layer: prune.stacked_masks(orders, counts)}, f"prune {source}")
  record = {"fingerprint": fingerprint, "layer": layer, "num_neurons": moments.mean.shape[-1],
            "target": defender.target, "counts": counts.tolist(), "methods": {},
            "multi_layer": {}, "evaluated": {}, "seconds": 0.0}
  for m, (method, order) in enumerate(orders.items()):
    rows = slice(m * len(counts), (m + 1) * len(counts))
    record["methods"][method] = {"order": order.tolist(),
                                 **{key: results[key][rows].tolist() for key in SWEEP_KEYS}}
  if multi_layers and source == EXTENDED_SOURCE:
    fractions = (0.0,) + tuple(cfg.multi_layer_levels)
    for norm in cfg.multi_layer_norms:
      scores = _multi_layer_scores(ctx, {name: statistics[name] for name in multi_layers}, norm)
      pruned, stacks = prune.multi_layer_masks(scores, fractions, scope=cfg.multi_layer)
      numbers = evaluate(variables, stacks, f"prune {source} {norm} layers", test=False,
                         mask_batch=1)
      record["multi_layer"][norm + LAYERS_SUFFIX] = {
          "norm": norm, "fractions": list(fractions), "pruned": pruned.tolist(),
          "scores": {name: values.tolist() for name, values in scores.items()},
          **{key: numbers[key].tolist() for key in CLEAN_SET_KEYS}}
  record["seconds"] = time.perf_counter() - started
  files.write_json(path, record)
  logging.info("prune/%s: swept %d methods x %d levels of %s%s in %.1f s", source, len(orders),
               len(counts), layer, f" and {len(record['multi_layer'])} over {len(multi_layers)} "
               "layers" if multi_layers else "", record["seconds"])
  return record


def _map_size(ctx: RunContext, model, variables, layer: str) -> int:
  image = jax.ShapeDtypeStruct((1, *ctx.dataset.image_shape), jnp.float32)
  shape = jax.eval_shape(lambda v, x: model.apply(v, x, stop=layer)[0], variables, image).shape
  return int(shape[1] * shape[2])


class _Models:
  """The pruned models a source's entries need, evaluated once and remembered.

  A model is a mask dict, optionally fine-tuned on S; its numbers are saved in the record
  under a name, so a resumed stage reuses them. Fine-tuned variables are also kept in memory
  by mask, so a model the sources share (Fine-Pruning's, the control) is tuned once.
  """

  def __init__(self, ctx: RunContext, model, variables, tuned_cache: dict):
    self.ctx, self.model, self.variables, self.tuned = ctx, model, variables, tuned_cache

  def numbers(self, record: dict, path: str, name: str, mask_dict: dict, evaluate, *,
              fine_tune: bool) -> dict[str, float]:
    key = json.dumps([fine_tune, {layer: np.asarray(m).astype(int).tolist()
                                  for layer, m in sorted(mask_dict.items())}])

    def compute():
      variables = self._fine_tuned(mask_dict, name) if fine_tune else self.variables
      return _evaluate_one(evaluate, variables, mask_dict, name), {}

    return self._remembered(record, path, name, key, compute)[0]

  def baseline(self, record: dict, path: str, name: str, defend, evaluate,
               unmasked: dict) -> tuple[dict[str, float], int]:
    """A baseline's numbers (its model evaluated with `unmasked`, all ones) and how many
    neurons it pruned; `defend()` gives (new variables, pruned count)."""

    def compute():
      started = time.perf_counter()
      variables, pruned = defend()
      logging.info("prune: baseline %s in %.1f s, %d neurons pruned", name,
                   time.perf_counter() - started, pruned)
      return _evaluate_one(evaluate, variables, unmasked, name), {"pruned": pruned}

    numbers, extra = self._remembered(record, path, name, json.dumps(["baseline", name]),
                                      compute)
    return numbers, extra["pruned"]

  @staticmethod
  def _remembered(record: dict, path: str, name: str, key: str, compute):
    """`compute()`'s (numbers, extra) saved in the record under `name`, or the saved ones."""
    saved = record["evaluated"].get(name)
    if saved is not None and saved["key"] == key:
      return saved["numbers"], saved.get("extra", {})
    numbers, extra = compute()
    record["evaluated"][name] = {"key": key, "numbers": numbers, "extra": extra}
    files.write_json(path, record)
    return numbers, extra

  def _fine_tuned(self, mask_dict: dict, name: str):
    cache_key = tuple((layer, np.asarray(m).tobytes()) for layer, m in sorted(mask_dict.items()))
    if cache_key not in self.tuned:
      cfg = self.ctx.config
      s_images, s_labels = self.ctx.clean_set
      started = time.perf_counter()
      self.tuned[cache_key] = finetune.fine_tune(
          self.model, self.variables, s_images, s_labels, mask_dict, _tuning_recipe(cfg),
          key=jax.random.fold_in(jax.random.key(cfg.seed), KEY_SALT))
      logging.info("prune: fine-tuned %s on S in %.1f s", name, time.perf_counter() - started)
    return self.tuned[cache_key]


def _tuning_recipe(cfg) -> finetune.Recipe:
  """The SGD and augmentation settings every tuning on S shares (fine-tuning, unlearning)."""
  return finetune.Recipe(
      epochs=cfg.prune.fine_tune_epochs, learning_rate=cfg.prune.fine_tune_learning_rate,
      momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay,
      batch_size=cfg.prune.fine_tune_batch_size, padding=cfg.train.crop_padding,
      flip=bool(cfg.train.flip), padding_mode=cfg.train.padding_mode,
      nesterov=bool(cfg.train.nesterov))


def _evaluate_one(evaluate, variables, mask_dict: dict, name: str) -> dict[str, float]:
  stacks = {layer: np.asarray(mask, np.float32)[None] for layer, mask in mask_dict.items()}
  return {k: float(v[0]) for k, v in evaluate(variables, stacks, f"prune {name}",
                                              mask_batch=1).items()}


def _baseline_defense(ctx: RunContext, name: str, model, variables, defender: Defender):
  """A baseline's defended variables and the number of neurons it pruned."""
  cfg = ctx.config
  key = jax.random.fold_in(jax.random.key(cfg.seed), BASELINE_SALTS.get(name, 0))
  s_images, s_labels = ctx.clean_set
  if name == "clp":
    defended, keep, _ = clp.defend(model, variables, ctx.dataset.image_shape,
                                   u=cfg.prune.clp_u)
    return defended, anp.num_pruned(keep)
  if name == "anp":
    settings = anp.Settings(iterations=cfg.prune.anp_iterations,
                            padding=cfg.train.crop_padding, flip=bool(cfg.train.flip))
    bar = ctx.progress.bar("prune anp", settings.iterations, part=0.0, unit="update")
    values = anp.learn_masks(model.apply, variables, s_images, s_labels, settings=settings,
                             key=key, on_update=lambda loss: bar.update(1, result=loss))
    bar.close()
    keep = anp.keep_above(values, cfg.prune.anp_threshold)
    return anp.pruned_variables(variables, keep), anp.num_pruned(keep)
  return unlearning.unlearn(model, variables, s_images, s_labels, defender.trigger,
                            _tuning_recipe(cfg), key=key,
                            share=cfg.prune.unlearning_share), 0


def _choose(cfg, method: str, values: dict) -> int:
  """The index of a method's level: Fine-Pruning's own rule, or METHOD.md's r*."""
  if method == prune.FINE_PRUNING and cfg.fine_pruning_level == "ca_drop":
    return prune.fine_pruning_level(values["CA_S"], ca_reference=values["CA_S"][0],
                                    delta=cfg.delta)
  return prune.choose_level(values["ASR_defender"], values["CA_S"],
                            ca_reference=values["CA_S"][0], tau=cfg.tau, delta=cfg.delta)


def _defend(ctx, source, model, variables, layer, multi_layers, defender, tuned) -> dict:
  """One source's results entry: every method at its level."""
  cfg = ctx.config.prune
  evaluate = _Evaluator(ctx, model, defender)
  record = _sweep(ctx, source, model, variables, layer, multi_layers, defender, evaluate)
  path = os.path.join(ctx.stage_dir(STAGE), f"sweep_{source}.json")
  pruned_models = _Models(ctx, model, variables, tuned)
  counts = record["counts"]
  first = next(iter(record["methods"].values()))
  before = {"ca_before": first["CA"][0], "asr_before": first["ASR_real"][0]}
  entry, chosen = {}, {}

  def add(name, r_star, numbers):
    entry[name] = prune.defense_entry(r_star=r_star, ca=numbers["CA"],
                                      asr_real=numbers["ASR_real"],
                                      asr_defender=numbers["ASR_defender"], **before)
    logging.info("prune/%s %s: r*=%d; CA %.2f -> %.2f, ASR %.2f -> %.2f, defender ASR %.2f, "
                 "DER %.2f", source, name, r_star, before["ca_before"], entry[name]["CA"],
                 before["asr_before"], entry[name]["ASR_real"], entry[name]["ASR_defender"],
                 entry[name]["DER"])

  extensions = source == EXTENDED_SOURCE
  for method, values in record["methods"].items():
    chosen[method] = _choose(cfg, method, values)
    r_star = counts[chosen[method]]
    mask_dict = {layer: prune.masks(values["order"], [r_star])[0]}
    if method == prune.FINE_PRUNING:
      add(method, r_star, pruned_models.numbers(record, path, method, mask_dict, evaluate,
                                                fine_tune=True))
      continue
    add(method, r_star, {key: values[key][chosen[method]] for key in SWEEP_KEYS})
    if cfg.fine_tune and extensions:
      add(method + TUNED_SUFFIX, r_star, pruned_models.numbers(
          record, path, method + TUNED_SUFFIX, mask_dict, evaluate, fine_tune=True))
  for name, values in record["multi_layer"].items():
    level = _choose(cfg, name, values)
    scores = {name_: np.asarray(s) for name_, s in values["scores"].items()}
    _, stacks = prune.multi_layer_masks(scores, [values["fractions"][level]],
                                        scope=cfg.multi_layer)
    mask_dict = {name_: stack[0] for name_, stack in stacks.items()}
    r_star = values["pruned"][level]
    add(name, r_star, pruned_models.numbers(record, path, name, mask_dict, evaluate,
                                            fine_tune=False))
    if cfg.fine_tune:
      add(name + TUNED_SUFFIX, r_star, pruned_models.numbers(
          record, path, name + TUNED_SUFFIX, mask_dict, evaluate, fine_tune=True))
  unpruned = {layer: np.ones(record["num_neurons"], np.float32)}
  if cfg.fine_tuning_control and extensions:
    add(FINE_TUNING, 0, pruned_models.numbers(record, path, FINE_TUNING, unpruned, evaluate,
                                              fine_tune=True))
  if extensions:
    for name in cfg.baselines:
      numbers, pruned = pruned_models.baseline(
          record, path, name,
          lambda name=name: _baseline_defense(ctx, name, model, variables, defender),
          evaluate, unpruned)
      add(name, pruned, numbers)
  _write_outputs(ctx, source, record, chosen)
  return entry


def _write_outputs(ctx, source, record, chosen) -> None:
  """sweep_<source>.csv, curves_<source>.png and, with multi-layer pruning, its S curves."""
  stage_dir = ctx.stage_dir(STAGE)
  counts = np.asarray(record["counts"])
  fractions = counts / record["num_neurons"]
  with open(os.path.join(stage_dir, f"sweep_{source}.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["method", "r", "fraction", *SWEEP_KEYS, "r_star"])
    for method, values in record["methods"].items():
      for i, count in enumerate(counts):
        writer.writerow([method, int(count), f"{fractions[i]:.4f}",
                         *(f"{values[key][i]:.4f}" for key in SWEEP_KEYS),
                         int(i == chosen[method])])
    for method, values in record["multi_layer"].items():
      level = _choose(ctx.config.prune, method, values)
      for i, pruned in enumerate(values["pruned"]):
        writer.writerow([method, pruned, f"{values['fractions'][i]:.4f}", "", "", "",
                         *(f"{values[key][i]:.4f}" for key in CLEAN_SET_KEYS), int(i == level)])
  curves = {method: {key: np.asarray(values[key]) for key in SWEEP_KEYS}
            for method, values in record["methods"].items()}
  title = (f"{source} trigger (target {record['target']}), layer {record['layer']}, "
           f"K={record['num_neurons']}; before fine-tuning")
  figures.save(figures.pruning_curves(fractions, curves, chosen, title=title),
               os.path.join(stage_dir, f"curves_{source}.png"))
  if record["multi_layer"]:
    values = next(iter(record["multi_layer"].values()))
    curves = {method: {key: np.asarray(v[key]) for key in CLEAN_SET_KEYS}
              for method, v in record["multi_layer"].items()}
    levels = {method: _choose(ctx.config.prune, method, v)
              for method, v in record["multi_layer"].items()}
    figures.save(figures.pruning_curves(
        np.asarray(values["fractions"]), curves, levels, panels=figures.CLEAN_SET_PANELS,
        title=f"{source} trigger, several layers ({ctx.config.prune.multi_layer} ranking), "
              "on S; before fine-tuning",
        xlabel="pruned share of the layers' neurons"),
        os.path.join(stage_dir, f"curves_{source}{LAYERS_SUFFIX}.png"))


def _check_levels(ctx: RunContext, model, variables, layer: str) -> None:
  """Fails before the stage computes anything when count levels exceed the layer's K."""
  image = jax.ShapeDtypeStruct((1, *ctx.dataset.image_shape), jnp.float32)
  features = jax.eval_shape(lambda v, x: model.apply(v, x, stop=layer)[0], variables, image)
  try:
    prune.level_counts(tuple(ctx.config.prune.levels), features.shape[-1],
                       unit=ctx.config.prune.level_unit)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.prune.levels: {e}") from None


def run(ctx: RunContext) -> dict:
  cfg = ctx.config.prune
  layer = cfg.layer or ctx.model().default_probe
  multi_layers = ()
  if cfg.multi_layer:
    multi_layers = tuple(cfg.multi_layers) or models.layer_names(ctx.model())
  model = ctx.model(probe_layers=tuple(dict.fromkeys((layer, *multi_layers))))
  _, variables = train_stage.load_trained(ctx, "backdoored")
  _check_levels(ctx, model, variables, layer)
  result, tuned = {}, {}
  for source in SOURCES:
    defender = _defender(ctx, source)
    if isinstance(defender, str):
      logging.warning("prune/%s: skipped: %s", source, defender)
      result[source] = {"skipped": defender}
      continue
    result[source] = _defend(ctx, source, model, variables, layer, multi_layers, defender, tuned)
  return result
