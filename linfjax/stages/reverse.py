"""The `reverse` stage: Neural Cleanse's synthetic trigger for the backdoored and the vanilla model.

Both finished models from the `train` stage go through one vmapped solve over all
classes (`linfjax.reverse`) on the defender's clean set S, with the same key, so their
mask norms compare. The vanilla model is the check that no class stands out without a
backdoor. Writes under `WORKDIR/reverse/`:
  backdoored/, vanilla/   checkpoints/ (orbax, every `reverse.checkpoint_every` steps, so a
                          killed run resumes at its step), triggers.npz (every class's
                          `masks` [K, H, W], `patterns` [K, H, W, C], `mask_l1`,
                          `anomaly_index`, `succeeded`) and triggers.png (masks, patterns
                          and their product, one column per class);
  synthetic_trigger.npz   only when a class of the backdoored model is flagged: `mask`
                          [H, W, 1] float32, `pattern` [H, W, C] float32, `target` int
                          (read it with `load_synthetic_trigger`);
  metrics.json            seconds, steps run and per-class costs of each solve.
Returns results.json's `reverse` entry (METHOD.md, "Results file"): `flagged`,
`anomaly_index`, `mask_l1` of the backdoored model, and the same under `vanilla`.

References:
  Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
  Networks", IEEE S&P 2019.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from linfjax import checkpoints, files, reverse, triggers
from linfjax.stages import train as train_stage
from linfjax.stages.context import RunContext

STAGE = "reverse"
MODEL_KINDS = train_stage.MODEL_KINDS
SYNTHETIC_TRIGGER_FILE = "synthetic_trigger.npz"
# Salt of the solve's key (train uses 0 and 1); both models share it.
KEY_SALT = 2


def synthetic_trigger_path(workdir: str) -> str:
  return os.path.join(workdir, STAGE, SYNTHETIC_TRIGGER_FILE)


def load_synthetic_trigger(workdir: str,
                           image_shape) -> tuple[triggers.Trigger, int] | None:
  """The flagged class's synthetic trigger and that class, or None if no class was flagged.

  Args:
    workdir: the run directory.
    image_shape: (H, W, C) of the images the trigger must fit.

  Returns:
    (Trigger with mask [H, W, 1] and pattern [H, W, C], target class), from
    `WORKDIR/reverse/synthetic_trigger.npz`; None when that file is absent.

  Raises:
    triggers.TriggerError: the file lacks an array, or its arrays do not fit the images
      or leave [0, 1].
  """
  path = synthetic_trigger_path(workdir)
  if not os.path.exists(path):
    return None
  height, width, channels = image_shape
  with np.load(path, allow_pickle=False) as arrays:
    missing = {"mask", "pattern", "target"} - set(arrays.files)
    if missing:
      raise triggers.TriggerError(f"{path}: lacks arrays {sorted(missing)}; has "
                                  f"{sorted(arrays.files)}")
    mask = np.asarray(arrays["mask"], np.float32)
    pattern = np.asarray(arrays["pattern"], np.float32)
    target = int(arrays["target"])
  if mask.shape != (height, width, 1) or pattern.shape != (height, width, channels):
    raise triggers.TriggerError(
        f"{path}: mask {mask.shape} and pattern {pattern.shape} do not fit images of shape "
        f"{tuple(image_shape)} (expected ({height}, {width}, 1) and {tuple(image_shape)})")
  for name, array in (("mask", mask), ("pattern", pattern)):
    if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
      raise triggers.TriggerError(f"{path}: {name} must hold values in [0, 1]")
  return triggers.Trigger(jnp.asarray(mask), jnp.asarray(pattern)), target


def _solve(ctx: RunContext, kind: str, log: dict) -> reverse.Reversed:
  """Runs (or resumes) the solve for one model; returns every class's trigger."""
  settings = reverse.Settings.from_config(ctx.config.reverse)
  model, variables = train_stage.load_trained(ctx, kind)
  images, _ = ctx.clean_set
  num_classes = ctx.dataset.num_classes
  key = jax.random.fold_in(jax.random.key(ctx.config.seed), KEY_SALT)
  store = checkpoints.StageCheckpoints(os.path.join(ctx.stage_dir(STAGE), kind, "checkpoints"))
  state, start_step = None, store.latest_step() or 0
  if start_step:
    like = reverse.init(jax.random.fold_in(key, 0), ctx.dataset.image_shape, num_classes,
                        settings)
    state = store.restore(like)
    logging.info("reverse/%s: resuming after step %d of %d", kind, start_step, settings.steps)
  every = ctx.config.reverse.checkpoint_every
  bar = tqdm.tqdm(total=settings.steps, initial=start_step, unit="step",
                  desc=f"reverse {kind}", disable=not ctx.progress, leave=False)
  steps_run = []

  def on_step(step, state, means):
    success = np.asarray(means["success"])
    done = bool(np.all(np.asarray(state.stopped)))
    if step % every == 0 or step == settings.steps or done:
      store.save(step, state)
    steps_run.append(step)
    bar.update(1)
    bar.set_postfix(success=f"{success.min():.2f}", stopped=int(np.sum(state.stopped)))
    if step % max(1, settings.steps // 10) and step != settings.steps and not done:
      return
    logging.info("reverse/%s: step %d/%d attack success min %.3f median %.3f, mask l1 "
                 "median %.1f, %d classes stopped", kind, step, settings.steps,
                 success.min(), np.median(success), np.median(np.asarray(means["l1"])),
                 int(np.sum(state.stopped)))

  started = time.perf_counter()
  state = reverse.solve(model.apply, variables, images, num_classes=num_classes, key=key,
                        settings=settings, state=state, start_step=start_step, on_step=on_step)
  bar.close()
  store.close()
  log.update(seconds=time.perf_counter() - started, steps_run=len(steps_run),
             last_step=steps_run[-1] if steps_run else start_step,
             cost=np.asarray(state.cost).tolist(), stopped=np.asarray(state.stopped).tolist())
  return reverse.result(state)


def _figure(outcome: reverse.Reversed, index: np.ndarray, flagged: int | None,
            class_names) -> Figure:
  """Masks, patterns and mask * pattern (rows), one column per class."""
  rows = (("mask", outcome.masks[..., None].repeat(outcome.patterns.shape[-1], -1)),
          ("pattern", outcome.patterns),
          ("mask x pattern", outcome.masks[..., None] * outcome.patterns))
  columns = len(outcome.masks)
  figure = Figure(figsize=(1.5 * columns, 1.7 * len(rows) + 0.4), dpi=100)
  FigureCanvasAgg(figure)
  for r, (label, images) in enumerate(rows):
    for c in range(columns):
      axes = figure.add_subplot(len(rows), columns, r * columns + c + 1)
      axes.imshow(np.clip(images[c], 0.0, 1.0), vmin=0.0, vmax=1.0)
      axes.set_xticks([])
      axes.set_yticks([])
      if r == 0:
        axes.set_title(f"{c} {class_names[c]}\nl1 {outcome.mask_l1[c]:.0f}, AI {index[c]:.1f}",
                       fontsize="small", color="tab:red" if c == flagged else "black")
      if c == 0:
        axes.set_ylabel(label, fontsize="small")
  return figure


def _report(ctx: RunContext, kind: str, outcome: reverse.Reversed) -> dict:
  """Writes one model's arrays and figure; returns its results entry."""
  threshold = ctx.config.reverse.anomaly_threshold
  index = np.asarray(reverse.anomaly_index(outcome.mask_l1))
  flagged = reverse.flagged(outcome.mask_l1, threshold=threshold, eligible=outcome.succeeded)
  kind_dir = os.path.join(ctx.stage_dir(STAGE), kind)
  files.write_npz(os.path.join(kind_dir, "triggers.npz"), masks=outcome.masks,
                   patterns=outcome.patterns, mask_l1=outcome.mask_l1, anomaly_index=index,
                   succeeded=outcome.succeeded)
  figure = _figure(outcome, index, flagged, ctx.dataset.class_names)
  figure.suptitle(f"Neural Cleanse on the {kind} model: flagged "
                  f"{'none' if flagged is None else flagged}")
  figure.savefig(os.path.join(kind_dir, "triggers.png"), format="png", bbox_inches="tight")
  if not outcome.succeeded.all():
    logging.warning("reverse/%s: classes %s never reached the attack-success threshold %.2f; "
                    "their masks are the last ones, not the best", kind,
                    np.flatnonzero(~outcome.succeeded).tolist(),
                    ctx.config.reverse.attack_success_threshold)
  if flagged is None:
    logging.info("reverse/%s: no class flagged (largest anomaly index %.2f <= %.2f among "
                 "classes below the median norm)", kind,
                 float(np.max(np.where(outcome.mask_l1 < np.median(outcome.mask_l1), index, 0.0))),
                 threshold)
  else:
    logging.info("reverse/%s: class %d flagged (anomaly index %.2f, mask l1 %.1f)", kind,
                 flagged, index[flagged], outcome.mask_l1[flagged])
  return {"flagged": flagged, "anomaly_index": [float(v) for v in index],
          "mask_l1": [float(v) for v in outcome.mask_l1]}


def run(ctx: RunContext) -> dict:
  stage_dir = ctx.stage_dir(STAGE)
  log, entries = {}, {}
  for kind in MODEL_KINDS:
    log[kind] = {}
    outcome = _solve(ctx, kind, log[kind])
    entries[kind] = _report(ctx, kind, outcome)
    if kind == "backdoored":
      path = synthetic_trigger_path(ctx.workdir)
      target = entries[kind]["flagged"]
      if target is None:
        logging.info("reverse: no synthetic trigger (no class of the backdoored model flagged)")
        if os.path.exists(path):
          os.remove(path)
      else:
        trigger = outcome.trigger(target)
        files.write_npz(path, mask=np.asarray(trigger.mask, np.float32),
                         pattern=np.asarray(trigger.pattern, np.float32),
                         target=np.int64(target))
  with open(os.path.join(stage_dir, "metrics.json"), "w") as f:
    json.dump(log, f, indent=1)
  return {**entries["backdoored"], "vanilla": entries["vanilla"]}
