"""The `analysis` stage: activation-norm shifts and Grad-CAM attention of both trained models.

For the backdoored and the vanilla model, on the defender's clean set S:
  - per-neuron l1/l2/linf statistics of every probe layer (the config's
    `model.probe_layers`, default the last conv map), clean and under the real
    trigger, and under the synthetic trigger when the reverse stage wrote
    `WORKDIR/reverse/synthetic_trigger.npz` (arrays `mask` [H, W, 1] and
    `pattern` [H, W, C] in [0, 1]); all conditions in one forward pass per batch;
  - Grad-CAM at the deepest probe layer for the attack's label, on up to
    ATTENTION_IMAGES images of S that the attack can flip, and the mean trigger
    attention: clean images measured inside the real trigger's region, triggered
    images inside the region of the trigger that was stamped.

Writes under `WORKDIR/analysis/`:
  <model>.npz      per-neuron moments, attention per image and the figures' maps; a
                   rerun after a kill reuses a finished model's file (same inputs only);
  analysis.json    summaries for every trigger, attention, and per-neuron shifts;
  shifts.csv       one row per (model, trigger, layer, norm, neuron);
  *.png            shift histograms, top-shifted neurons' maps, Grad-CAM panels.
Returns the `analysis` entry of results.json (docs/method.md, "Results file"): the summaries
under the real trigger and the attention.
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
from absl import logging

from linfjax import attacks, files, fingerprint, models, pixels
from linfjax.attacks import poison
from linfjax.detection import gradcam, norms
from linfjax.reports import figures
from linfjax.runs.stages import reverse as reverse_stage
from linfjax.runs.stages import train as train_stage
from linfjax.runs.stages.context import RunContext

MODEL_KINDS = train_stage.MODEL_KINDS
ATTENTION_IMAGES = 100  # S images whose Grad-CAM attention is averaged.
PANEL_IMAGES = 3  # Images shown in the Grad-CAM and activation-map figures.
TOP_NEURONS = 4  # Most shifted neurons (linf, real trigger) shown per layer.
# A synthetic mask is a sigmoid, positive everywhere; its region is where it reaches half
# its maximum (ours: a binary patch mask gives its square, as `attacks.region` does).
SYNTHETIC_REGION_LEVEL = 0.5


def synthetic_region(trigger: attacks.Trigger) -> np.ndarray:
  """[H, W] bool: where a synthetic mask reaches SYNTHETIC_REGION_LEVEL of its maximum."""
  mask = np.asarray(trigger.mask)[..., 0]
  return (mask > 0) & (mask >= SYNTHETIC_REGION_LEVEL * mask.max())


def _probe_layers(ctx: RunContext) -> tuple[str, ...]:
  model = ctx.model()
  return tuple(ctx.config.model.probe_layers) or (model.default_probe,)


def _gradcam_layer(ctx: RunContext, layers) -> str:
  """The deepest probe layer (the default probe, the last conv map, unless set otherwise)."""
  return max(layers, key=models.layer_names(ctx.model()).index)


def _attention_inputs(ctx: RunContext) -> tuple[np.ndarray, np.ndarray]:
  """Up to ATTENTION_IMAGES images of S the attack can flip (float [n, H, W, C]) and the
  attack's label for each (the class Grad-CAM explains)."""
  cfg = ctx.config
  images, labels = ctx.clean_set
  attack = np.asarray(poison.poisoned_labels(labels, mode=cfg.poison.mode,
                                             target=cfg.poison.target,
                                             num_classes=ctx.dataset.num_classes))
  chosen = np.flatnonzero(labels != attack)[:ATTENTION_IMAGES]
  if not len(chosen):
    raise ValueError("no image of the clean set S has a label other than the attack's label; "
                     "Grad-CAM attention needs at least one")
  return np.asarray(pixels.to_unit_float(images[chosen])), attack[chosen].astype(np.int32)


def _fingerprint(ctx: RunContext, variables, layers, conditions) -> str:
  """What a saved model file was computed from (weights, S, triggers, settings); a mismatch
  means recompute, so a model retrained in place is never matched with old numbers."""
  images, labels = ctx.clean_set
  return fingerprint.fingerprint(
      layers=list(layers), conditions=list(conditions),
      triggers=fingerprint.digest(array for trigger in conditions.values() for array in trigger),
      weights=fingerprint.tree_digest(variables),
      clean_set=fingerprint.digest([ctx.split.clean_set_indices, images, labels]),
      attention_images=ATTENTION_IMAGES, norms=list(norms.NORMS))


def _analyse_model(ctx, kind, variables, apply_fn, layers, conditions,
                   regions) -> dict[str, np.ndarray]:
  """All of one model's numbers, as the flat arrays of its .npz file."""
  images, _ = ctx.clean_set
  batch_size = ctx.config.train.eval_batch_size
  x, classes = _attention_inputs(ctx)
  inputs = {"clean": x, **{name: np.asarray(attacks.apply(t, x)) for name, t in
                           conditions.items()}}
  bar = ctx.progress.bar(f"analysis {kind}", math.ceil(len(images) / batch_size) + len(inputs),
                         part=1 / len(MODEL_KINDS), unit="batch")
  moments = norms.norm_statistics(apply_fn, variables, images, list(conditions.values()),
                                  batch_size=batch_size, on_batch=bar.update)
  arrays = {}
  for layer in layers:
    arrays[f"moments/{layer}/count"] = np.asarray(moments[layer].count)
    arrays[f"moments/{layer}/mean"] = moments[layer].mean
    arrays[f"moments/{layer}/m2"] = moments[layer].m2

  cam_layer = _gradcam_layer(ctx, layers)
  for name, condition_images in inputs.items():
    maps = gradcam.batched_gradcam(apply_fn, variables, condition_images, classes,
                                   layer=cam_layer, batch_size=min(batch_size, len(x)))
    region = regions["real" if name == "clean" else name]
    arrays[f"attention/{name}"] = np.asarray(gradcam.attention(maps, region))
    arrays[f"gradcam/{name}"] = maps[:PANEL_IMAGES]
    bar.update()
  bar.close()

  panel = x[:PANEL_IMAGES]
  _, clean_activations = apply_fn(variables, panel)
  _, triggered_activations = apply_fn(variables, attacks.apply(ctx.trigger, panel))
  linf = norms.NORMS.index("linf")
  for layer in layers:
    top = np.argsort(-norms.shifts(moments[layer])[0, linf])[:TOP_NEURONS]
    arrays[f"top/{layer}/neurons"] = top
    for name, activations in (("clean", clean_activations), ("real", triggered_activations)):
      arrays[f"top/{layer}/{name}"] = np.moveaxis(np.asarray(activations[layer])[..., top], -1, 1)
  return arrays


def _model_arrays(ctx, kind, apply_fn, layers, conditions, regions) -> dict[str, np.ndarray]:
  """A model's arrays from its finished file when its inputs match; else computed and saved."""
  path = os.path.join(ctx.stage_dir("analysis"), f"{kind}.npz")
  _, variables = train_stage.load_trained(ctx, kind)
  fingerprint = _fingerprint(ctx, variables, layers, conditions)
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as f:
      saved = {name: f[name] for name in f.files}
    if str(saved.pop("fingerprint", "")) == fingerprint:
      logging.info("analysis/%s: finished earlier, loaded %s", kind, path)
      return saved
    logging.info("analysis/%s: %s was computed from other inputs; recomputing", kind, path)
  arrays = _analyse_model(ctx, kind, variables, apply_fn, layers, conditions, regions)
  files.write_npz(path, **arrays, fingerprint=np.asarray(fingerprint))
  return arrays


def _moments(arrays, layer) -> norms.Moments:
  return norms.Moments(float(arrays[f"moments/{layer}/count"]), arrays[f"moments/{layer}/mean"],
                       arrays[f"moments/{layer}/m2"])


def _write_tables(stage_dir, per_model, layers, conditions, report) -> None:
  """analysis.json (summaries, attention, per-neuron shifts) and shifts.csv."""
  shifts = {}
  with open(os.path.join(stage_dir, "shifts.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["model", "trigger", "layer", "norm", "neuron", "clean_mean", "clean_std",
                     "triggered_mean", "triggered_std", "delta"])
    for kind, arrays in per_model.items():
      for c, condition in enumerate(conditions):
        for layer in layers:
          moments = _moments(arrays, layer)
          delta, std = norms.shifts(moments)[c], moments.std
          for n, norm in enumerate(norms.NORMS):
            shifts.setdefault(kind, {}).setdefault(condition, {}).setdefault(layer, {})[norm] = (
                delta[n].tolist())
            for k in range(delta.shape[-1]):
              writer.writerow([kind, condition, layer, norm, k, moments.mean[0, n, k],
                               std[0, n, k], moments.mean[c + 1, n, k], std[c + 1, n, k],
                               delta[n, k]])
  with open(os.path.join(stage_dir, "analysis.json"), "w") as f:
    json.dump({**report, "shifts": shifts}, f, indent=1)


def _write_figures(ctx, stage_dir, per_model, layers, conditions) -> None:
  for c, condition in enumerate(conditions):
    for layer in layers:
      deltas = {kind: dict(zip(norms.NORMS, norms.shifts(_moments(arrays, layer))[c]))
                for kind, arrays in per_model.items()}
      figures.save(figures.shift_histograms(deltas, title=f"{layer}, {condition} trigger"),
                   os.path.join(stage_dir, f"shifts_{condition}_{layer}.png"))
  x, _ = _attention_inputs(ctx)
  panel = x[:PANEL_IMAGES]
  images = {"clean": panel, **{name: np.asarray(attacks.apply(t, panel))
                               for name, t in conditions.items()}}
  for kind, arrays in per_model.items():
    for layer in layers:
      figure = figures.activation_maps(
          images["clean"], images["real"], arrays[f"top/{layer}/clean"],
          arrays[f"top/{layer}/real"], arrays[f"top/{layer}/neurons"].tolist(),
          title=f"{kind} {layer}: largest linf shifts under the real trigger")
      figures.save(figure, os.path.join(stage_dir, f"top_neurons_{kind}_{layer}.png"))
  maps = {kind: {name: arrays[f"gradcam/{name}"] for name in images}
          for kind, arrays in per_model.items()}
  figures.save(figures.gradcam_panels(images, maps, title="Grad-CAM for the attack's label"),
               os.path.join(stage_dir, "gradcam.png"))


def run(ctx: RunContext) -> dict:
  stage_dir = ctx.stage_dir("analysis")
  layers = _probe_layers(ctx)
  conditions = {"real": ctx.trigger}
  regions = {"real": np.asarray(attacks.region(ctx.trigger))}
  loaded = reverse_stage.load_synthetic_trigger(ctx.workdir, ctx.dataset.image_shape,
                                                ctx.dataset.num_classes)
  if loaded is None:
    logging.info("analysis: no synthetic trigger (no class flagged, or no reverse stage)")
  else:
    conditions["synthetic"] = loaded[0]
    regions["synthetic"] = synthetic_region(loaded[0])
  apply_fn = ctx.model().apply  # One function for both models: one compile serves both.
  per_model = {kind: _model_arrays(ctx, kind, apply_fn, layers, conditions, regions)
               for kind in MODEL_KINDS}

  result, summaries = {}, {}
  for kind, arrays in per_model.items():
    summaries[kind] = {condition: {layer: norms.layer_summary(_moments(arrays, layer), c)
                                   for layer in layers}
                       for c, condition in enumerate(conditions)}
    result[kind] = summaries[kind]["real"]
  result["attention"] = {
      kind: {name: float(np.mean(arrays[f"attention/{name}"]))
             for name in ("clean", *conditions)}
      for kind, arrays in per_model.items()}
  for kind in MODEL_KINDS:
    for layer in layers:
      linf = result[kind][layer]["linf"]
      logging.info("analysis/%s %s: linf z %.2f top1_share %.3f rel %.2f; attention %s", kind,
                   layer, linf["z"], linf["top1_share"], linf["rel"], result["attention"][kind])
  report = {"layers": list(layers), "gradcam_layer": _gradcam_layer(ctx, layers),
            "summaries": summaries, "attention": result["attention"]}
  _write_tables(stage_dir, per_model, layers, conditions, report)
  _write_figures(ctx, stage_dir, per_model, layers, conditions)
  return result
