"""The `prune` stage: the lp-based pruning defense and Fine-Pruning on the backdoored model.

For each trigger source the defender's trigger `T^` is
  - "synthetic": the reverse stage's trigger and flagged class (the realistic setting);
    skipped, and recorded as skipped, when no class was flagged;
  - "real": the attack's own trigger and label (analysis only).
On the defender's clean set S the neurons of the pruned layer are ranked per norm (and by
clean mean activation for Fine-Pruning), and one sweep per split evaluates every
(method, level) mask: on the test split CA and ASR under the real trigger, on S the CA and
the ASR under `T^` (the defender's view). r* is chosen from the S numbers only; Fine-Pruning,
and every method when `prune.fine_tune` is set, is then fine-tuned on S at r* with its
mask fixed, and the results entry reports the fine-tuned model.

Writes under `WORKDIR/prune/`:
  sweep_<source>.json  rankings, the sweep's per-level numbers and fine-tuned results; a
                       rerun after a kill reuses what it holds (same inputs only);
  sweep_<source>.csv   one row per (method, level), r* marked;
  curves_<source>.png  CA and ASR against the pruning level, one line per method.
Returns results.json's `prune` entry (METHOD.md, "Results file"): per source, per method,
`r_star` (a neuron count), CA, ASR_real, ASR_defender, dCA, dASR and DER, relative to the
backdoored model before the defense on the test split (the sweep's level 0).

References:
  Xu et al., "Defending against Backdoor Attack on Deep Neural Networks", arXiv
  2002.12162. Liu et al., "Fine-Pruning: Defending Against Backdooring Attacks on Deep
  Neural Networks", RAID 2018.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from linfjax import config as config_lib
from linfjax import figures, files, finetune, prune, triggers
from linfjax.stages import reverse as reverse_stage
from linfjax.stages import train as train_stage
from linfjax.stages.context import RunContext

STAGE = "prune"
SOURCES = ("synthetic", "real")
NOT_FLAGGED = "no class flagged by reverse engineering"
NO_REVERSE_STAGE = "the reverse stage is not in config.stages"
# Salt of the fine-tuning key (train uses 0 and 1, reverse 2).
KEY_SALT = 3
SWEEP_KEYS = ("CA", "ASR_real", "RA_real", "CA_S", "ASR_defender")


def _defender(ctx: RunContext, source: str):
  """(trigger, target, mode) the defender uses for `source`, or the reason it is skipped."""
  if source == "real":
    return ctx.trigger, ctx.config.poison.target, ctx.config.poison.mode
  if "reverse" not in ctx.config.stages:
    return NO_REVERSE_STAGE
  loaded = reverse_stage.load_synthetic_trigger(ctx.workdir, ctx.dataset.image_shape)
  if loaded is None:
    return NOT_FLAGGED
  trigger, target = loaded
  return trigger, target, "all_to_one"


def _fingerprint(ctx: RunContext, layer: str, trigger: triggers.Trigger, target: int) -> str:
  """What a saved sweep was computed from; a mismatch means recompute."""
  digest = hashlib.sha256()
  for array in trigger:
    digest.update(np.asarray(array, np.float32).tobytes())
  return json.dumps({"layer": layer, "trigger": digest.hexdigest(), "target": int(target),
                     "prune": json.loads(ctx.config.prune.to_json()),
                     "clean_set": len(ctx.split.clean_set_indices),
                     "test": len(ctx.dataset.test_labels)}, sort_keys=True)


class _Evaluator:
  """Evaluates mask stacks on the test split and on S for one source."""

  def __init__(self, ctx: RunContext, model, layer: str, defender):
    self.ctx, self.apply_fn, self.layer = ctx, model.apply, layer
    self.trigger, self.target, self.mode = defender

  def __call__(self, variables, mask_stack, desc: str) -> dict[str, np.ndarray]:
    cfg, ctx = self.ctx.config, self.ctx
    batch_size = cfg.train.eval_batch_size
    s_images, s_labels = ctx.clean_set
    batches = (math.ceil(len(ctx.dataset.test_labels) / batch_size)
               + math.ceil(len(s_labels) / batch_size))
    bar = tqdm.tqdm(total=batches, unit="batch", desc=desc, disable=not ctx.progress,
                    leave=False)
    common = dict(layer=self.layer, num_classes=ctx.dataset.num_classes,
                  batch_size=batch_size, mask_batch=cfg.prune.mask_batch,
                  on_batch=lambda: bar.update(1))
    test = prune.sweep(self.apply_fn, variables, ctx.dataset.test_images,
                       ctx.dataset.test_labels, ctx.trigger, mask_stack,
                       target=cfg.poison.target, mode=cfg.poison.mode, **common)
    defender = prune.sweep(self.apply_fn, variables, s_images, s_labels, self.trigger,
                           mask_stack, target=self.target, mode=self.mode, **common)
    bar.close()
    return {"CA": test["CA"], "ASR_real": test["ASR"], "RA_real": test["RA"],
            "CA_S": defender["CA"], "ASR_defender": defender["ASR"]}


def _sweep(ctx, source, model, variables, layer, defender, evaluate) -> dict:
  """The source's saved record when its inputs match, else the sweep, computed and saved."""
  path = os.path.join(ctx.stage_dir(STAGE), f"sweep_{source}.json")
  fingerprint = _fingerprint(ctx, layer, defender[0], defender[1])
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
  moments, map_size = prune.layer_statistics(model.apply, variables, s_images, defender[0],
                                             layer=layer,
                                             batch_size=ctx.config.train.eval_batch_size)
  orders = prune.method_rankings(moments, norm_list=tuple(cfg.norms), score=cfg.score,
                                 map_size=map_size, fine_pruning=cfg.fine_pruning)
  counts = prune.level_counts(tuple(cfg.levels), moments.mean.shape[-1], unit=cfg.level_unit)
  results = evaluate(variables, prune.stacked_masks(orders, counts), f"prune {source}")
  record = {"fingerprint": fingerprint, "layer": layer, "num_neurons": moments.mean.shape[-1],
            "target": int(defender[1]), "counts": counts.tolist(), "methods": {},
            "fine_tuned": {}, "seconds": 0.0}
  for m, (method, order) in enumerate(orders.items()):
    rows = slice(m * len(counts), (m + 1) * len(counts))
    record["methods"][method] = {"order": order.tolist(),
                                 **{key: results[key][rows].tolist() for key in SWEEP_KEYS}}
  record["seconds"] = time.perf_counter() - started
  files.write_json(path, record)
  logging.info("prune/%s: swept %d methods x %d levels of %s in %.1f s", source, len(orders),
               len(counts), layer, record["seconds"])
  return record


def _fine_tuned(ctx, source, record, method, r_star, model, variables, layer, evaluate,
                tuned) -> dict:
  """The numbers of `method`'s pruned model at r* after fine-tuning on S (saved, reused)."""
  saved = record["fine_tuned"].get(method)
  if saved is not None and saved["r_star"] == r_star:
    return saved
  mask = prune.masks(record["methods"][method]["order"], [r_star])
  key = mask.tobytes()
  if key not in tuned:  # Fine-Pruning's ranking needs no trigger: sources often share it.
    cfg = ctx.config
    recipe = finetune.Recipe(
        epochs=cfg.prune.fine_tune_epochs, learning_rate=cfg.prune.fine_tune_learning_rate,
        momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay,
        batch_size=cfg.train.batch_size, padding=cfg.train.crop_padding,
        flip=bool(cfg.train.flip), padding_mode=cfg.train.padding_mode,
        nesterov=bool(cfg.train.nesterov))
    s_images, s_labels = ctx.clean_set
    started = time.perf_counter()
    tuned[key] = finetune.fine_tune(model, variables, s_images, s_labels, {layer: mask[0]},
                                    recipe, key=jax.random.fold_in(
                                        jax.random.key(cfg.seed), KEY_SALT))
    logging.info("prune/%s: fine-tuned %s at r*=%d on S in %.1f s", source, method, r_star,
                 time.perf_counter() - started)
  numbers = evaluate(tuned[key], mask, f"prune {source} {method} fine-tuned")
  saved = {"r_star": r_star, **{k: float(v[0]) for k, v in numbers.items()}}
  record["fine_tuned"][method] = saved
  files.write_json(os.path.join(ctx.stage_dir(STAGE), f"sweep_{source}.json"), record)
  return saved


def _write_outputs(ctx, source, record, chosen) -> None:
  """sweep_<source>.csv and curves_<source>.png."""
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
  curves = {method: {key: np.asarray(values[key]) for key in SWEEP_KEYS}
            for method, values in record["methods"].items()}
  title = (f"{source} trigger (target {record['target']}), layer {record['layer']}, "
           f"K={record['num_neurons']}; before fine-tuning")
  figures.save(figures.pruning_curves(fractions, curves, chosen, title=title),
               os.path.join(stage_dir, f"curves_{source}.png"))


def _defend(ctx, source, model, variables, layer, defender, tuned) -> dict:
  """One source's results entry: every method at its r*."""
  cfg = ctx.config.prune
  evaluate = _Evaluator(ctx, model, layer, defender)
  record = _sweep(ctx, source, model, variables, layer, defender, evaluate)
  counts = record["counts"]
  first = next(iter(record["methods"].values()))
  ca_before, asr_before = first["CA"][0], first["ASR_real"][0]  # Level 0: nothing pruned.
  entry, chosen = {}, {}
  for method, values in record["methods"].items():
    chosen[method] = prune.choose_level(values["ASR_defender"], values["CA_S"],
                                        ca_reference=values["CA_S"][0], tau=cfg.tau,
                                        delta=cfg.delta)
    r_star = counts[chosen[method]]
    at_r = {key: values[key][chosen[method]] for key in SWEEP_KEYS}
    if method == prune.FINE_PRUNING or cfg.fine_tune:
      at_r = _fine_tuned(ctx, source, record, method, r_star, model, variables, layer,
                         evaluate, tuned)
    entry[method] = prune.defense_entry(
        r_star=r_star, ca=at_r["CA"], asr_real=at_r["ASR_real"],
        asr_defender=at_r["ASR_defender"], ca_before=ca_before, asr_before=asr_before)
    logging.info("prune/%s %s: r*=%d of %d; CA %.2f -> %.2f, ASR %.2f -> %.2f, defender ASR "
                 "%.2f, DER %.2f", source, method, r_star, record["num_neurons"], ca_before,
                 entry[method]["CA"], asr_before, entry[method]["ASR_real"],
                 entry[method]["ASR_defender"], entry[method]["DER"])
  _write_outputs(ctx, source, record, chosen)
  return entry


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
  layer = ctx.config.prune.layer or ctx.model().default_probe
  model = ctx.model(probe_layers=(layer,))
  _, variables = train_stage.load_trained(ctx, "backdoored")
  _check_levels(ctx, model, variables, layer)
  result, tuned = {}, {}
  for source in SOURCES:
    defender = _defender(ctx, source)
    if isinstance(defender, str):
      logging.warning("prune/%s: skipped: %s; only the real trigger (analysis only) is "
                      "evaluated", source, defender)
      result[source] = {"skipped": defender}
      continue
    result[source] = _defend(ctx, source, model, variables, layer, defender, tuned)
  return result
