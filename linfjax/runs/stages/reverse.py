"""The `reverse` stage: Neural Cleanse's synthetic trigger for the backdoored and the vanilla model.

Both finished models from the `train` stage go through one vmapped solve over all
classes (`linfjax.detection.neural_cleanse`) on the defender's clean set S, with the same key, so their
mask norms compare; `linfjax.detection.outliers` then flags the outlier class, if any, and names the
suspect (the flagged class, else the smallest mask that reached the attack-success
threshold). The vanilla model is the check that no class stands out without a backdoor.
Writes under `WORKDIR/reverse/`:
  backdoored/, vanilla/   checkpoints/ (orbax, every `reverse.checkpoint_every` steps, so a
                          killed run resumes at its step), triggers.npz (every class's
                          `masks` [K, H, W], `patterns` [K, H, W, C], `mask_l1`,
                          `anomaly_index`, `succeeded`) and triggers.png (masks, patterns
                          and their product, one column per class);
  synthetic_trigger.npz   the backdoored model's suspect's trigger, flagged or not: `mask`
                          [H, W, 1] float32, `pattern` [H, W, C] float32, `target` int,
                          `flagged` bool (read it with `load_synthetic_trigger`);
  metrics.json            seconds, steps run and per-class costs of each solve.
In a grid (`ctx.shared` set), the vanilla model's solve is a shared piece
(linfjax/runs/shared_work.py) keyed by `vanilla_dependencies`: the first run that needs it solves
into the grid's `shared/vanilla_reverse/<key>/` (its checkpoints and `outcome.npz`), and every
run reads that outcome and writes its own `vanilla/triggers.npz` and figure from it, so its
directory stays a complete single run and its detection uses its own statistic.
Returns results.json's `reverse` entry (docs/method.md, "Results file"): `flagged` (null when no
class is flagged), `suspect`, NC's `anomaly_index`, the index under every other statistic
(`<statistic>_index`), `mask_l1` and `succeeded` of the backdoored model, and the same
under `vanilla`. An index is null where it is undefined (a class that never succeeded).

References:
  Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
  Networks", IEEE S&P 2019.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from linfjax.runs import checkpoints
from linfjax import files, keys
from linfjax.detection import outliers, recovery, neural_cleanse as reverse
from linfjax import attacks
from linfjax.runs.stages import train as train_stage
from linfjax.runs.stages.context import RunContext

STAGE = "reverse"
MODEL_KINDS = train_stage.MODEL_KINDS
SYNTHETIC_TRIGGER_FILE = "synthetic_trigger.npz"
VANILLA_PIECE = "vanilla_reverse"
OUTCOME_FILE = "outcome.npz"


def vanilla_dependencies(config) -> dict:
  """The config values that Neural Cleanse on the vanilla model depends on, and no others.

  The vanilla model's own (seed, data incl. the clean set S, model, training recipe) and
  the solve's settings; not the trigger or poisoning, nor the detection statistic and its
  threshold (each run applies its own to the shared outcome) or the checkpoint interval.
  """
  settings = reverse.Settings.from_config(config.reverse)
  return {**train_stage.vanilla_dependencies(config), "reverse": dataclasses.asdict(settings)}


def synthetic_trigger_path(workdir: str) -> str:
  return os.path.join(workdir, STAGE, SYNTHETIC_TRIGGER_FILE)


def load_synthetic_trigger(workdir: str, image_shape,
                           num_classes: int) -> tuple[attacks.Trigger, int, bool] | None:
  """The suspect class's synthetic trigger, that class, and whether it was flagged.

  Args:
    workdir: the run directory.
    image_shape: (H, W, C) of the images the trigger must fit.
    num_classes: the dataset's classes; the saved target must be one of them.

  Returns:
    (Trigger with mask [H, W, 1] and pattern [H, W, C], target class, flagged), from
    `WORKDIR/reverse/synthetic_trigger.npz`; None when that file is absent (no reverse
    stage, or no class reached the attack-success threshold).

  Raises:
    attacks.TriggerError: the file lacks an array, its arrays do not fit the images or
      leave [0, 1], or its target is not a class.
  """
  path = synthetic_trigger_path(workdir)
  if not os.path.exists(path):
    return None
  height, width, channels = image_shape
  with np.load(path, allow_pickle=False) as arrays:
    missing = {"mask", "pattern", "target", "flagged"} - set(arrays.files)
    if missing:
      raise attacks.TriggerError(f"{path}: lacks arrays {sorted(missing)}; has "
                                  f"{sorted(arrays.files)}")
    mask = np.asarray(arrays["mask"], np.float32)
    pattern = np.asarray(arrays["pattern"], np.float32)
    target, flagged = arrays["target"], arrays["flagged"]
    if target.shape != () or target.dtype.kind not in "iu" or flagged.dtype != bool:
      raise attacks.TriggerError(f"{path}: 'target' must be one integer and 'flagged' a "
                                  f"bool, got {target.dtype} {target.shape} and {flagged.dtype}")
    target, flagged = int(target), bool(flagged)
  if not 0 <= target < num_classes:
    raise attacks.TriggerError(f"{path}: target {target} is not a class of this dataset "
                                f"(0..{num_classes - 1}); delete {os.path.dirname(path)} to "
                                "redo the reverse stage")
  if mask.shape != (height, width, 1) or pattern.shape != (height, width, channels):
    raise attacks.TriggerError(
        f"{path}: mask {mask.shape} and pattern {pattern.shape} do not fit images of shape "
        f"{tuple(image_shape)} (expected ({height}, {width}, 1) and {tuple(image_shape)})")
  for name, array in (("mask", mask), ("pattern", pattern)):
    if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
      raise attacks.TriggerError(f"{path}: {name} must hold values in [0, 1]")
  return attacks.Trigger(jnp.asarray(mask), jnp.asarray(pattern)), target, flagged


def _solve(ctx: RunContext, kind: str, log: dict, *,
           checkpoint_dir: str | None = None) -> reverse.Reversed:
  """Runs (or resumes) the solve for one model; returns every class's trigger.

  Checkpoints go to `checkpoint_dir`, by default the run's own `reverse/<kind>/checkpoints`.
  """
  settings = reverse.Settings.from_config(ctx.config.reverse)
  model, variables = train_stage.load_trained(ctx, kind)
  images, _ = ctx.clean_set
  num_classes = ctx.dataset.num_classes
  key = keys.run_key(ctx.config.seed, keys.REVERSE)  # Both models share it.
  store = checkpoints.StageCheckpoints(
      checkpoint_dir or os.path.join(ctx.stage_dir(STAGE), kind, "checkpoints"))
  state, start_step = None, store.latest_step() or 0
  if start_step:
    like = reverse.init(jax.random.fold_in(key, 0), ctx.dataset.image_shape, num_classes,
                        settings)
    state = store.restore(like)
    logging.info("reverse/%s: resuming after step %d of %d", kind, start_step, settings.steps)
  every = ctx.config.reverse.checkpoint_every
  bar = ctx.progress.bar(f"reverse {kind}", settings.steps, part=1 / len(MODEL_KINDS),
                         initial=start_step)
  steps_run = []

  def on_step(step, state, means):
    success = np.asarray(means["success"])
    stopped = np.asarray(state.schedule.stopped)
    if step % every == 0 or step == settings.steps or stopped.all():
      store.save(step, state)
    steps_run.append(step)
    bar.update(1)  # The step's means were read above: its work is finished.
    bar.set_postfix(success=f"{success.min():.2f}", stopped=int(stopped.sum()))
    if step % max(1, settings.steps // 10) and step != settings.steps and not stopped.all():
      return
    logging.info("reverse/%s: step %d/%d attack success min %.3f median %.3f, mask l1 "
                 "median %.1f, %d classes stopped", kind, step, settings.steps,
                 success.min(), np.median(success), np.median(np.asarray(means["l1"])),
                 int(stopped.sum()))

  started = time.perf_counter()
  state = reverse.solve(model.apply, variables, images, num_classes=num_classes, key=key,
                        settings=settings, state=state, start_step=start_step, on_step=on_step)
  bar.close()
  store.close()
  log.update(seconds=time.perf_counter() - started, steps_run=len(steps_run),
             last_step=steps_run[-1] if steps_run else start_step,
             cost=np.asarray(state.schedule.cost).tolist(),
             stopped=np.asarray(state.schedule.stopped).tolist())
  return reverse.result(state)


def _shared_vanilla_solve(ctx: RunContext, log: dict) -> reverse.Reversed:
  """The grid's solve on this run's vanilla model: run here unless another run did."""
  piece = ctx.shared.piece(VANILLA_PIECE, vanilla_dependencies(ctx.config))

  def solve_vanilla() -> dict:
    piece_log = {}
    outcome = _solve(ctx, "vanilla", piece_log, checkpoint_dir=piece.path("checkpoints"))
    files.write_npz(piece.path(OUTCOME_FILE), **outcome._asdict())
    return piece_log

  computed_here = piece.compute_once(solve_vanilla)
  log.update(piece.summary(), shared=piece.directory, solved_by_this_run=computed_here)
  if not computed_here:
    logging.info("reverse/vanilla: shared with earlier runs of the grid (%s)", piece.directory)
  with np.load(piece.path(OUTCOME_FILE), allow_pickle=False) as arrays:
    return reverse.Reversed(**{name: arrays[name] for name in reverse.Reversed._fields})


# Classes per row of the triggers figure; more classes (GTSRB's 43) wrap into further rows.
FIGURE_COLUMNS = 15


def _figure(outcome: reverse.Reversed, detection: outliers.Detection, class_names,
            region: np.ndarray | None = None) -> Figure:
  """Masks, patterns and mask * pattern (rows), one column per class, FIGURE_COLUMNS classes
  a band; the real trigger's `region`, when given, outlined in red on every mask."""
  rows = (("mask", outcome.masks[..., None].repeat(outcome.patterns.shape[-1], -1)),
          ("pattern", outcome.patterns),
          ("mask x pattern", outcome.masks[..., None] * outcome.patterns))
  num_classes = len(outcome.masks)
  columns = min(num_classes, FIGURE_COLUMNS)
  bands = math.ceil(num_classes / columns)
  figure = Figure(figsize=(1.5 * columns, (1.7 * len(rows) + 0.4) * bands), dpi=100)
  FigureCanvasAgg(figure)
  for c in range(num_classes):
    band, column = divmod(c, columns)
    for r, (label, images) in enumerate(rows):
      axes = figure.add_subplot(len(rows) * bands, columns,
                                (band * len(rows) + r) * columns + column + 1)
      axes.imshow(np.clip(images[c], 0.0, 1.0), vmin=0.0, vmax=1.0)
      if r == 0 and region is not None:
        axes.contour(region.astype(float), levels=[0.5], colors="red", linewidths=0.8)
      axes.set_xticks([])
      axes.set_yticks([])
      if r == 0:
        index = "failed" if not outcome.succeeded[c] else f"AI {detection.index[c]:.1f}"
        color = ("tab:red" if c == detection.flagged else
                 "tab:orange" if c == detection.suspect else "black")
        axes.set_title(f"{c} {class_names[c]}\nl1 {outcome.mask_l1[c]:.0f}, {index}",
                       fontsize="small", color=color)
      if column == 0:
        axes.set_ylabel(label, fontsize="small")
  return figure


def _json_floats(values) -> list:
  """Floats for results.json, None where a value is not finite (JSON has no NaN or inf)."""
  return [float(v) if math.isfinite(v) else None for v in np.asarray(values, np.float64)]


def _recovery(ctx: RunContext, outcome: reverse.Reversed, detection: outliers.Detection,
              region: np.ndarray) -> dict:
  """How well the suspect's (and the real target's) mask recovers the real trigger's region."""
  entry = {"region_pixels": int(region.sum())}
  classes = {"suspect": detection.suspect}
  if ctx.config.poison.mode == "all_to_one":
    classes["target"] = ctx.config.poison.target
  for role, c in classes.items():
    if c is not None:
      entry[role] = {"class": int(c), **recovery.recovery(outcome.masks[c], region)}
  return entry


def _report(ctx: RunContext, kind: str, outcome: reverse.Reversed) -> tuple[dict, outliers.Detection]:
  """Writes one model's arrays and figure; returns its results entry and verdict.

  For the backdoored model of a trigger with a region (a patch), the entry's `recovery`
  says how well the suspect's and the target's masks recover it (linfjax/detection/recovery.py).
  """
  cfg = ctx.config.reverse
  detecting = outliers.Settings.from_config(cfg)
  threshold = detecting.threshold
  detection = outliers.detect(outcome.mask_l1, outcome.succeeded, statistic=detecting.statistic,
                              threshold=threshold)
  others = {name: statistic.index(outcome.mask_l1, outcome.succeeded)
            for name, statistic in outliers.STATISTICS.items() if name != "nc"}
  kind_dir = os.path.join(ctx.stage_dir(STAGE), kind)
  os.makedirs(kind_dir, exist_ok=True)
  files.write_npz(os.path.join(kind_dir, "triggers.npz"), masks=outcome.masks,
                  patterns=outcome.patterns, mask_l1=outcome.mask_l1,
                  anomaly_index=detection.nc_index, succeeded=outcome.succeeded,
                  **{f"{name}_index": index for name, index in others.items()})
  region = np.asarray(attacks.region(ctx.trigger))
  region = region if kind == "backdoored" and recovery.has_region(region) else None
  figure = _figure(outcome, detection, ctx.dataset.class_names, region)
  verdict = (f"flagged {detection.flagged}" if detection.flagged is not None else
             f"none flagged, suspect {detection.suspect}")
  figure.suptitle(f"Neural Cleanse on the {kind} model ({cfg.statistic} index): {verdict}")
  figure.savefig(os.path.join(kind_dir, "triggers.png"), format="png", bbox_inches="tight")
  if not outcome.succeeded.all():
    logging.warning("reverse/%s: classes %s never reached the attack-success threshold %.2f; "
                    "they are left out of the anomaly statistics", kind,
                    np.flatnonzero(~outcome.succeeded).tolist(), cfg.attack_success_threshold)
  largest = np.nanmax(np.where(outcome.mask_l1 <= np.median(outcome.mask_l1), detection.index,
                               np.nan), initial=0.0)
  logging.info("reverse/%s: %s (%s index: largest below the median %.2f, threshold %.2f)",
               kind, verdict, cfg.statistic, largest, threshold)
  entry = {"flagged": detection.flagged, "suspect": detection.suspect,
           "anomaly_index": _json_floats(detection.nc_index),
           **{f"{name}_index": _json_floats(index) for name, index in others.items()},
           "mask_l1": [float(v) for v in outcome.mask_l1],
           "succeeded": [bool(v) for v in outcome.succeeded]}
  if region is not None:
    entry["recovery"] = _recovery(ctx, outcome, detection, region)
    for role, values in entry["recovery"].items():
      if isinstance(values, dict):
        logging.info("reverse/%s: the %s class %d's mask holds %.1f %% of its mass inside the "
                     "real trigger (IoU %.2f of its top %d pixels)", kind, role, values["class"],
                     100 * values["share"], values["iou"], region.sum())
  return entry, detection


def run(ctx: RunContext) -> dict:
  stage_dir = ctx.stage_dir(STAGE)
  log, entries = {}, {}
  for kind in MODEL_KINDS:
    log[kind] = {}
    if kind == "vanilla" and ctx.shared is not None:
      outcome = _shared_vanilla_solve(ctx, log[kind])
    else:
      outcome = _solve(ctx, kind, log[kind])
    entries[kind], detection = _report(ctx, kind, outcome)
    if kind != "backdoored":
      continue
    path = synthetic_trigger_path(ctx.workdir)
    if detection.suspect is None:
      logging.warning("reverse: no class of the backdoored model reached the attack-success "
                      "threshold; there is no synthetic trigger for the defense")
      if os.path.exists(path):
        os.remove(path)
      continue
    trigger = outcome.trigger(detection.suspect)
    files.write_npz(path, mask=np.asarray(trigger.mask, np.float32),
                    pattern=np.asarray(trigger.pattern, np.float32),
                    target=np.int64(detection.suspect),
                    flagged=np.bool_(detection.flagged is not None))
  files.write_json(os.path.join(stage_dir, "metrics.json"), log)
  return {**entries["backdoored"], "vanilla": entries["vanilla"]}
