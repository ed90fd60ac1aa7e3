"""Neural Cleanse's detection rates over many runs, per statistic, with held-out thresholds.

    python -m linfjax.reports.detection_rates --calibration RUN [RUN ...] \\
        [--held_out NAME RUN [RUN ...]] ... [--json FILE]

Each RUN is a run directory whose results.json has the reverse stage (its backdoored and its
vanilla model). For every statistic of `reverse.statistic`, a threshold is chosen on the
calibration runs alone (linfjax/detection/rates.py), then the rates are reported on the
calibration runs and on every held-out set at that threshold and at the statistic's default:
targets flagged, wrong classes flagged, vanilla models flagged, and the AUROC of the largest
below-median index between backdoored and vanilla models. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np

from linfjax import errors, files
from linfjax.detection import outliers, rates
from linfjax.reports import html


def read_models(run: str) -> list[rates.Model]:
  """The backdoored and vanilla models of one run directory."""
  try:
    with open(os.path.join(run, "results.json")) as f:
      results = json.load(f)
    with open(os.path.join(run, "config.json")) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise errors.UserError(f"{run}: not a run directory with results.json and config.json "
                           f"({errors.one_line(e)})") from None
  if "reverse" not in results:
    raise errors.UserError(f"{run}: results.json has no reverse stage (run it with the stage "
                           "'reverse')")
  if config["poison"]["mode"] != "all_to_one":
    raise errors.UserError(f"{run}: an all-to-all attack has no single target to flag")
  entry = results["reverse"]
  return [rates.Model(np.asarray(entry["mask_l1"]), np.asarray(entry["succeeded"]),
                      int(config["poison"]["target"])),
          rates.Model(np.asarray(entry["vanilla"]["mask_l1"]),
                      np.asarray(entry["vanilla"]["succeeded"]), None)]


def _fraction(count: int, total: int) -> str:
  return f"{count}/{total}"


def table(calibration: list[rates.Model], held_out: dict[str, list[rates.Model]]) -> tuple[str, dict]:
  """The Markdown table and the same numbers as a dict."""
  sets = {"calibration": calibration, **held_out}
  rows, numbers = [], {}
  for statistic, known in outliers.STATISTICS.items():
    chosen = rates.choose_threshold(calibration, statistic)
    numbers[statistic] = {"chosen_threshold": chosen,
                          "default_threshold": known.default_threshold, "sets": {}}
    for which, threshold in (("chosen", chosen), ("default", known.default_threshold)):
      for name, models in sets.items():
        counted = rates.rates(models, statistic, threshold)
        numbers[statistic]["sets"].setdefault(name, {})[which] = counted.as_dict()
        rows.append((statistic, f"{threshold:.2f} ({which})", name,
                     _fraction(counted.target_flagged, counted.backdoored),
                     _fraction(counted.wrong_flagged, counted.backdoored),
                     _fraction(counted.vanilla_flagged, counted.vanilla),
                     "-" if counted.auroc is None else f"{counted.auroc:.3f}"))
  header = ("statistic", "threshold", "models", "target flagged", "wrong class flagged",
            "vanilla flagged", "AUROC")
  return html.markdown(header, rows) + "\n", numbers


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m linfjax.reports.detection_rates",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--calibration", nargs="+", required=True, metavar="RUN",
                      help="runs the thresholds are chosen on")
  parser.add_argument("--held_out", nargs="+", action="append", default=[],
                      metavar="NAME RUN", help="a named set of runs to report on (repeatable)")
  parser.add_argument("--json", default="", help="also write the numbers to this JSON file")
  args = parser.parse_args(argv[1:])
  try:
    calibration = [model for run in args.calibration for model in read_models(run)]
    held_out = {}
    for group in args.held_out:
      if len(group) < 2:
        raise errors.UserError(f"--held_out {' '.join(group)}: give a name, then its runs")
      held_out[group[0]] = [model for run in group[1:] for model in read_models(run)]
  except errors.UserError as e:
    print(f"error: {errors.one_line(e)}", file=sys.stderr)
    return errors.EXIT_USER_ERROR
  text, numbers = table(calibration, held_out)
  print(text, end="")
  if args.json:
    files.write_json(args.json, numbers)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
