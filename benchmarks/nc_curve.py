"""Neural Cleanse's detection against its budget: one run's outlier indices, step by step.

    python benchmarks/nc_curve.py --workdir=runs/quick --steps=48

Reads a run whose train stage has finished (its `config.json`, data and both models),
solves Neural Cleanse again on the backdoored and the vanilla model with the run's reverse
settings but `--steps` steps, and after every step prints a row: the step, the seconds
both solves have taken so far, and per statistic (`outliers.STATISTICS`: nc, log, ratio)
the index of the attack's target on the backdoored model and the largest index of any
vanilla class below the median (what a false flag would need). Indices are computed on
each class's best mask so far, as the reverse stage would report them had it stopped
there. The quick defaults (reverse.steps and the threshold of `reverse.statistic`) are
chosen from this table; README "Defaults we chose" keeps the one it printed.

Ends with `ratio nc_separation_at_config_steps V target 1`: at the run's own
`reverse.steps`, the target's index over the largest vanilla one under the run's statistic
(above 1: the threshold can sit between them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import ml_collections
import numpy as np

from linfjax import keys
from linfjax.detection import neural_cleanse as reverse
from linfjax.detection import outliers
from linfjax.runs import pipeline
from linfjax.runs.stages import train as train_stage


def _indices(state) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Per statistic: (index [K], below-median candidates [K] bool) of the best masks so far."""
  outcome = reverse.result(state)
  succeeded = outcome.succeeded
  indices = {}
  for name, statistic in outliers.STATISTICS.items():
    index = statistic.index(outcome.mask_l1, succeeded) if succeeded.sum() >= 1 else (
        np.full(len(succeeded), np.nan))
    below = succeeded & (outcome.mask_l1 < np.median(outcome.mask_l1[succeeded])) if (
        succeeded.sum() >= outliers.MIN_CLASSES) else np.zeros_like(succeeded)
    indices[name] = (np.asarray(index, np.float64), below)
  return indices


def curve(workdir: str, steps: int) -> list[dict]:
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.reverse.steps = steps
  ctx = pipeline.make_context(config, workdir, progress=False)
  settings = reverse.Settings.from_config(config.reverse)
  images, _ = ctx.clean_set
  key = keys.run_key(config.seed, keys.REVERSE)
  rows = [dict(step=step) for step in range(1, steps + 1)]
  seconds = 0.0
  for kind in train_stage.MODEL_KINDS:
    model, variables = train_stage.load_trained(ctx, kind)
    started = time.perf_counter()

    def on_step(step, state, means, kind=kind, started=started):
      del means
      row = rows[step - 1]
      row[f"{kind}_seconds"] = time.perf_counter() - started
      for name, (index, below) in _indices(state).items():
        if kind == "backdoored":
          row[f"target_{name}"] = float(index[config.poison.target])
        else:
          row[f"vanilla_max_{name}"] = float(np.nanmax(np.where(below, index, np.nan),
                                                       initial=0.0))

    reverse.solve(model.apply, variables, images, num_classes=ctx.dataset.num_classes, key=key,
                  settings=settings, on_step=on_step)
    seconds += time.perf_counter() - started
  last = {kind: 0.0 for kind in train_stage.MODEL_KINDS}
  for row in rows:  # A solve whose classes all stopped early reports no later steps.
    for kind in train_stage.MODEL_KINDS:
      last[kind] = row.setdefault(f"{kind}_seconds", last[kind])
    row["seconds"] = sum(row[f"{kind}_seconds"] for kind in train_stage.MODEL_KINDS)
  return rows


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a run whose train stage finished")
  parser.add_argument("--steps", type=int, default=48)
  args = parser.parse_args(argv[1:])
  with open(os.path.join(args.workdir, "config.json")) as f:
    saved = json.load(f)
  rows = curve(args.workdir, args.steps)
  names = tuple(outliers.STATISTICS)
  print("step  seconds  " + "  ".join(f"target_{n:<5} vanilla_max_{n:<5}" for n in names))
  for row in rows:
    print(f"{row['step']:4d}  {row['seconds']:7.1f}  " + "  ".join(
        f"{row.get(f'target_{n}', float('nan')):12.2f} {row.get(f'vanilla_max_{n}', float('nan')):17.2f}"
        for n in names))
  statistic = saved["reverse"]["statistic"]
  at = rows[min(saved["reverse"]["steps"], args.steps) - 1]
  separation = at[f"target_{statistic}"] / max(at[f"vanilla_max_{statistic}"], 1e-12)
  print(f"ratio nc_separation_at_config_steps {separation:.3f} target 1")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
