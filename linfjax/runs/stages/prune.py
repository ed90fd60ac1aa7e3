"""The `prune` stage: the configured defenses for each trigger source, evaluated and written.

For each trigger source the defender's trigger `T^` and target are
  - "synthetic": the reverse stage's suspect class and its trigger (the realistic setting),
    whether or not Neural Cleanse flagged it (results.json's `reverse.flagged` says; the
    defenses get it as `Inputs.flagged`);
  - "real": the attack's own trigger and label (analysis only).
The defenses of `prune.defenses` (synthetic source) and `prune.real_defenses` (real source)
run in order from `linfjax.defenses.DEFENSES`, each on the backdoored model, S and `T^`; only
S numbers choose anything. This stage then measures each defended model: on the test split
CA, RA and the ASR under the real trigger, on S the defender-side ASR under `T^`. A defense
that swept pruning levels of layer L is measured at every level on the test split too, all
such defenses in one vmapped call, for the curves.

Writes under `WORKDIR/prune/`:
  <source>/<defense>.json  what the defense chose, its curve on S (and the test split), its
                           numbers and seconds, with a fingerprint of the inputs: a rerun
                           after a kill reuses every defense whose inputs match;
  sweep_<source>.csv       one row per (defense, level) of the sweeping defenses, r* marked;
  curves_<source>.png, curves_<source>_layers.png  CA and ASR against the pruning level.
Returns results.json's `prune` entry (docs/method.md, "Results file"): per source, per defense,
`r_star` (neurons pruned), CA, ASR_real, ASR_defender, dCA, dASR and DER, relative to the
backdoored model before the defense on the test split.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time

import numpy as np
from absl import logging

from linfjax import attacks, fingerprint, files, models, settings
from linfjax.defenses import DEFENSES, Choice, pruning
from linfjax.defenses.base import Inputs, Record
from linfjax.reports import figures
from linfjax.runs.stages import reverse as reverse_stage
from linfjax.runs.stages import train as train_stage
from linfjax.runs.stages.context import RunContext
from linfjax.training import metrics

STAGE = "prune"
SOURCES = ("synthetic", "real")
NO_SYNTHETIC_TRIGGER = "no class of the backdoored model reached the attack-success threshold"
NO_REVERSE_STAGE = "the reverse stage is not in config.stages"
TEST_KEYS = ("CA", "ASR_real", "RA_real")
CLEAN_SET_KEYS = ("CA_S", "ASR_defender")


@dataclasses.dataclass(frozen=True)
class Defender:
  """The trigger the defender uses, the class it sends images to, the mode, and whether Neural
  Cleanse flagged that class (True for the real trigger)."""
  trigger: attacks.TriggerLike
  target: int
  mode: str
  flagged: bool


def _defender(ctx: RunContext, source: str) -> Defender | str:
  """What the defender uses for `source`, or the reason the source is skipped."""
  if source == "real":
    return Defender(ctx.trigger, ctx.config.poison.target, ctx.config.poison.mode, True)
  if "reverse" not in ctx.config.stages:
    return NO_REVERSE_STAGE
  loaded = reverse_stage.load_synthetic_trigger(ctx.workdir, ctx.dataset.image_shape,
                                                ctx.dataset.num_classes)
  if loaded is None:
    return NO_SYNTHETIC_TRIGGER
  trigger, target, flagged = loaded
  return Defender(trigger, target, "all_to_one", flagged)


def defense_names(config, source: str) -> tuple[str, ...]:
  """The defenses configured for a trigger source, in order."""
  values = Choice.from_config(config.prune)
  return tuple(values.defenses if source == "synthetic" else values.real_defenses)


def probe_layers(config, model) -> tuple[str, str | tuple[str, ...]]:
  """Layer L and every layer a configured defense reads (L first)."""
  layer = config.prune.layer or model.default_probe
  extra = [layer for source in SOURCES for name in defense_names(config, source)
           for layer in DEFENSES[name].layers(model, config.prune)]
  return layer, tuple(dict.fromkeys((layer, *extra)))


def _earliest(model, mask_stacks) -> str:
  return min(mask_stacks, key=models.layer_names(model).index)


def _test_sweep(ctx: RunContext, inputs: Inputs, variables, mask_stacks, desc: str, *,
                mask_batch: int) -> dict[str, np.ndarray]:
  """The defended models (one per stacked mask) on the test split: CA, ASR and RA under the
  real trigger."""
  cfg = ctx.config
  bar = ctx.progress.bar(desc, -(-len(ctx.dataset.test_labels) // inputs.eval_batch_size),
                         part=0.0, unit="batch")
  numbers = pruning.sweep(inputs.model.apply, variables, ctx.dataset.test_images,
                          ctx.dataset.test_labels, ctx.trigger, mask_stacks,
                          start=_earliest(inputs.model, mask_stacks), target=cfg.poison.target,
                          mode=cfg.poison.mode, num_classes=ctx.dataset.num_classes,
                          batch_size=inputs.eval_batch_size, mask_batch=mask_batch,
                          on_batch=lambda: bar.update(1))
  bar.close()
  return {"CA": numbers["CA"], "ASR_real": numbers["ASR"], "RA_real": numbers["RA"]}


def _single(ctx: RunContext, inputs: Inputs, record: Record, name: str) -> dict[str, float]:
  """One defended model's numbers on S (under `T^`) and on the test split."""
  masks = record.masks or {inputs.layer: np.ones(inputs.neurons(inputs.layer), np.float32)}
  stacks = {layer: np.asarray(mask, np.float32)[None] for layer, mask in masks.items()}
  variables = inputs.variables if record.variables is None else record.variables
  numbers = {**inputs.clean_set_sweep(stacks, mask_batch=1, desc=f"prune {name}",
                                     variables=variables),
             **_test_sweep(ctx, inputs, variables, stacks, f"prune {name}", mask_batch=1)}
  return {key: float(value[0]) for key, value in numbers.items()}


def _fingerprint(ctx: RunContext, inputs: Inputs, defender: Defender, name: str) -> str:
  """What a saved outcome was computed from (model weights included); a mismatch recomputes."""
  return fingerprint.fingerprint(
      defense=name, layer=inputs.layer, weights=fingerprint.tree_digest(inputs.variables),
      trigger=fingerprint.tree_digest(defender.trigger), target=defender.target,
      flagged=defender.flagged, prune=json.loads(ctx.config.prune.to_json()),
      train=json.loads(ctx.config.train.to_json()),
      clean_set=fingerprint.digest([ctx.split.clean_set_indices]),
      test=len(ctx.dataset.test_labels))


def _run_defense(ctx: RunContext, inputs: Inputs, name: str, fingerprint_: str,
                 path: str) -> dict:
  """Runs one defense and saves its outcome (and its masks, beside it as .npz), with the
  seconds it took (its test-split curve, measured with the others', not counted)."""
  started = time.perf_counter()
  defense = DEFENSES[name]
  record = defense.run(inputs, defense.from_config(ctx.config.prune))
  inputs.cache.setdefault("records", {})[name] = record
  curve = record.curve
  outcome = {"fingerprint": fingerprint_, "target": inputs.target,
             "pruned": int(record.pruned), "details": record.details, "curve": None}
  arrays = {f"mask/{layer}": np.asarray(m, np.float32) for layer, m in (record.masks or {}).items()}
  if curve is not None:
    outcome["curve"] = {"pruned": np.asarray(curve.pruned).tolist(),
                        "fractions": np.asarray(curve.fractions, np.float64).tolist(),
                        "chosen": int(curve.chosen), "test": bool(curve.test),
                        **{key: np.asarray(curve.clean_set[key]).tolist()
                           for key in CLEAN_SET_KEYS}}
    arrays.update({f"curve/{layer}": np.asarray(stack, np.float32)
                   for layer, stack in curve.masks.items()})
  if curve is None or not curve.test or record.variables is not None:
    outcome["numbers"] = _single(ctx, inputs, record, name)
  outcome["seconds"] = round(time.perf_counter() - started, 2)
  files.write_npz(path[:-len(".json")] + ".npz", **arrays)
  files.write_json(path, outcome)
  return outcome


def _outcomes(ctx: RunContext, source: str, inputs: Inputs, defender: Defender) -> dict:
  """Every configured defense's outcome for `source`: saved ones whose inputs match, the others
  run; then the test-split curves of the sweeping defenses, in one call."""
  directory = os.path.join(ctx.stage_dir(STAGE), source)
  os.makedirs(directory, exist_ok=True)
  outcomes, paths = {}, {}
  for name in defense_names(ctx.config, source):
    paths[name] = os.path.join(directory, f"{name}.json")
    expected = _fingerprint(ctx, inputs, defender, name)
    saved = _read(paths[name])
    if saved is not None and saved.get("fingerprint") == expected:
      logging.info("prune/%s %s: finished earlier, loaded %s", source, name, paths[name])
      outcomes[name] = saved
    else:
      outcomes[name] = _run_defense(ctx, inputs, name, expected, paths[name])
  pending = [name for name, outcome in outcomes.items() if outcome["curve"] is not None
             and outcome["curve"]["test"] and "CA" not in outcome["curve"]]
  if pending:
    started = time.perf_counter()
    stacks = {name: _curve_masks(paths[name]) for name in pending}
    joined = np.concatenate([stacks[name] for name in pending])
    numbers = _test_sweep(ctx, inputs, inputs.variables, {inputs.layer: joined},
                          f"prune {source}", mask_batch=ctx.config.prune.mask_batch)
    start = 0
    for name in pending:
      count = len(stacks[name])
      curve = outcomes[name]["curve"]
      curve.update({key: values[start:start + count].tolist() for key, values in numbers.items()})
      start += count
      if "numbers" not in outcomes[name]:
        chosen = curve["chosen"]
        outcomes[name]["numbers"] = {key: float(curve[key][chosen])
                                     for key in TEST_KEYS + CLEAN_SET_KEYS}
      files.write_json(paths[name], outcomes[name])
    logging.info("prune/%s: test-split curves of %s in %.1f s", source, ", ".join(pending),
                 time.perf_counter() - started)
  return outcomes


def _curve_masks(path: str) -> np.ndarray:
  with np.load(path[:-len(".json")] + ".npz", allow_pickle=False) as arrays:
    (key,) = [key for key in arrays.files if key.startswith("curve/")]
    return arrays[key]


def _read(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None  # A damaged outcome is computed again.


def defense_entry(*, r_star: int, ca: float, asr_real: float, asr_defender: float,
                  ca_before: float, asr_before: float) -> dict[str, float]:
  """results.json's entry for one defense (docs/method.md, "Metrics" and "Results file").

  `dCA`, `dASR` and `DER` compare with the backdoored model before the defense, all on
  the test split.
  """
  return {"r_star": int(r_star), "CA": float(ca), "ASR_real": float(asr_real),
          "ASR_defender": float(asr_defender), "dCA": float(ca_before - ca),
          "dASR": float(asr_before - asr_real),
          "DER": metrics.der(ca_before=ca_before, ca_after=ca, asr_before=asr_before,
                             asr_after=asr_real)}


def _before(ctx: RunContext, inputs: Inputs, outcomes: dict) -> dict[str, float]:
  """The backdoored model's test CA and ASR before any defense: the unpruned level of the first
  swept curve, else one evaluation of the unpruned model."""
  for outcome in outcomes.values():
    curve = outcome["curve"]
    if curve is not None and "CA" in curve:
      return {"ca_before": curve["CA"][0], "asr_before": curve["ASR_real"][0]}
  numbers = _single(ctx, inputs, Record(pruned=0), "unpruned")
  return {"ca_before": numbers["CA"], "asr_before": numbers["ASR_real"]}


def _defend(ctx: RunContext, source: str, inputs: Inputs, defender: Defender) -> dict:
  """One source's results entry: every configured defense, in order."""
  outcomes = _outcomes(ctx, source, inputs, defender)
  before = _before(ctx, inputs, outcomes)
  entry = {}
  for name, outcome in outcomes.items():
    numbers = outcome["numbers"]
    entry[name] = defense_entry(r_star=outcome["pruned"], ca=numbers["CA"],
                                asr_real=numbers["ASR_real"],
                                asr_defender=numbers["ASR_defender"], **before)
    took = f"; {outcome['seconds']:.1f} s" if "seconds" in outcome else ""  # None in older saves.
    logging.info("prune/%s %s: r*=%d; CA %.2f -> %.2f, ASR %.2f -> %.2f, defender ASR %.2f, "
                 "DER %.2f%s", source, name, outcome["pruned"], before["ca_before"],
                 entry[name]["CA"], before["asr_before"], entry[name]["ASR_real"],
                 entry[name]["ASR_defender"], entry[name]["DER"], took)
  _write_outputs(ctx, source, outcomes, defender, inputs)
  return entry


def _write_outputs(ctx: RunContext, source: str, outcomes: dict, defender: Defender,
                   inputs: Inputs) -> None:
  """sweep_<source>.csv, curves_<source>.png and, for several layers, their curves on S."""
  stage_dir = ctx.stage_dir(STAGE)
  curves = {name: o["curve"] for name, o in outcomes.items() if o["curve"] is not None}
  with open(os.path.join(stage_dir, f"sweep_{source}.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["method", "r", "fraction", *TEST_KEYS, *CLEAN_SET_KEYS, "r_star"])
    for name, curve in curves.items():
      for i, pruned in enumerate(curve["pruned"]):
        test = [f"{curve[key][i]:.4f}" if key in curve else "" for key in TEST_KEYS]
        writer.writerow([name, pruned, f"{curve['fractions'][i]:.4f}", *test,
                         *(f"{curve[key][i]:.4f}" for key in CLEAN_SET_KEYS),
                         int(i == curve["chosen"])])
  one_layer = {name: c for name, c in curves.items() if "CA" in c}
  if one_layer:
    title = (f"{source} trigger (target {defender.target}), layer {inputs.layer}, "
             f"K={inputs.neurons(inputs.layer)}; before fine-tuning")
    figures.save(figures.pruning_curves(
        {name: {key: np.asarray(c[key]) for key in ("fractions", *TEST_KEYS, *CLEAN_SET_KEYS)}
         for name, c in one_layer.items()},
        {name: c["chosen"] for name, c in one_layer.items()}, title=title),
        os.path.join(stage_dir, f"curves_{source}.png"))
  layered = {name: c for name, c in curves.items() if "CA" not in c}
  if layered:
    figures.save(figures.pruning_curves(
        {name: {key: np.asarray(c[key]) for key in ("fractions", *CLEAN_SET_KEYS)}
         for name, c in layered.items()},
        {name: c["chosen"] for name, c in layered.items()}, panels=figures.CLEAN_SET_PANELS,
        title=f"{source} trigger, several layers ({ctx.config.prune.layers.ranking} ranking), on "
              "S; before fine-tuning", xlabel="pruned share of the layers' neurons"),
        os.path.join(stage_dir, f"curves_{source}_layers.png"))


def check_levels(ctx: RunContext, model, variables, layer: str) -> None:
  """Fails before the stage computes anything when count levels exceed the layer's K."""
  try:
    pruning.level_counts(tuple(ctx.config.prune.levels),
                         pruning.num_neurons(model, variables, ctx.dataset.image_shape, layer),
                         unit=ctx.config.prune.level_unit)
  except ValueError as e:
    raise settings.ConfigError(f"config.prune.levels: {e}") from None


def run(ctx: RunContext) -> dict:
  layer, layers = probe_layers(ctx.config, ctx.model())
  model = ctx.model(probe_layers=layers)
  _, variables = train_stage.load_trained(ctx, "backdoored")
  check_levels(ctx, model, variables, layer)
  images, labels = ctx.clean_set
  tuned: dict = {}  # Models fine-tuned on S, shared by the sources (the same mask, once).
  result = {}
  for source in SOURCES:
    defender = _defender(ctx, source)
    if isinstance(defender, str):
      logging.warning("prune/%s: skipped: %s", source, defender)
      result[source] = {"skipped": defender}
      continue
    inputs = Inputs(model=model, variables=variables, images=images, labels=labels,
                    trigger=defender.trigger, target=defender.target, mode=defender.mode,
                    layer=layer, seed=ctx.config.seed, recipe=ctx.config.train,
                    eval_batch_size=ctx.config.train.eval_batch_size, flagged=defender.flagged,
                    bar=lambda desc, total, unit="batch": ctx.progress.bar(desc, total, part=0.0,
                                                                          unit=unit),
                    cache={"tuned": tuned})
    result[source] = _defend(ctx, source, inputs, defender)
  return result
