"""Mean and spread of results.json numbers across runs (for example, seeds of one config).

    python -m linfjax.reports.summarize runs/quick_s0 runs/quick_s1 runs/quick_s2

prints one Markdown row per number in the runs' results.json files: its path
(`train.backdoored.ASR`), the mean, the sample standard deviation, the minimum,
the maximum and how many of the runs have it ("3 of 5": the other runs lack the number
or hold null there, so the row averages those 3 only). Seeds and class indices
(`seed`, `flagged`, `suspect`, `target`) are not averaged: a second table counts their
values, null included. A third table pairs the runs: for each trigger source, the per-run
differences linf - l2 and linf - l1 of the paper's defense (ASR after, CA after, DER), their
mean, and in how many runs linf did better (lower ASR, higher CA or DER).
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
from typing import Iterable

from linfjax.reports import html
from linfjax.reports import results as results_lib

# Leaves named so are labels (a seed, a class index), not quantities: counted, never averaged.
CATEGORICAL = ("seed", "flagged", "suspect", "target", "class")
# The paper's comparison: linf against each other norm, run by run.
PAIRED_METHODS = (("linf", "l2"), ("linf", "l1"))
# Per number, +1 when larger is better for the defense, -1 when smaller is.
PAIRED_KEYS = {"ASR_real": -1, "CA": 1, "DER": 1}


def flatten(tree) -> dict[str, float | None]:
  """Numeric and null leaves of nested dicts as {'a.b.c': value}; lists and strings skipped."""
  return results_lib.flatten(tree, lists=False)


def is_categorical(path: str) -> bool:
  return path.rsplit(".", 1)[-1] in CATEGORICAL


def summarize(results: Iterable[dict]) -> dict[str, dict[str, float]]:
  """Per numeric leaf path: mean, std (sample, ddof 1; 0 for one run), min, max, n (runs with
  a number there) and runs (all runs); categorical leaves and nulls are left out."""
  results = list(results)
  values: dict[str, list[float]] = {}
  for result in results:
    for path, value in flatten(result).items():
      if not is_categorical(path) and value is not None:
        values.setdefault(path, []).append(value)
  summary = {}
  for path, vals in values.items():
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    summary[path] = {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "n": n,
                     "runs": len(results)}
  return summary


def categorical_counts(results: Iterable[dict]) -> dict[str, dict[str, int]]:
  """Per categorical leaf path: how many runs hold each value ('null' for null, 'absent')."""
  results = list(results)
  paths = list(dict.fromkeys(path for result in results for path in flatten(result)
                             if is_categorical(path)))
  counts = {}
  for path in paths:
    counter = collections.Counter()
    for result in results:
      leaves = flatten(result)
      if path not in leaves:
        counter["absent"] += 1
      elif leaves[path] is None:
        counter["null"] += 1
      else:
        counter[f"{leaves[path]:g}"] += 1
    counts[path] = dict(counter)
  return counts


def paired_differences(results: Iterable[dict]) -> list[dict]:
  """Per source, method pair and number: the per-run differences `first - second` over the
  runs that have both, their mean, and how many runs favour the first method.

  Returns:
    Rows {'source', 'first', 'second', 'key', 'differences', 'mean', 'first_better', 'n'}.
  """
  results = list(results)
  sources = list(dict.fromkeys(source for result in results
                               for source in result.get("prune", {})))
  rows = []
  for source in sources:
    for first, second in PAIRED_METHODS:
      for key, sign in PAIRED_KEYS.items():
        differences = []
        for result in results:
          methods = result.get("prune", {}).get(source, {})
          a, b = methods.get(first, {}), methods.get(second, {})
          if isinstance(a, dict) and isinstance(b, dict) and key in a and key in b:
            differences.append(a[key] - b[key])
        if differences:
          rows.append({"source": source, "first": first, "second": second, "key": key,
                       "differences": differences, "n": len(differences),
                       "mean": sum(differences) / len(differences),
                       "first_better": sum(sign * d > 0 for d in differences)})
  return rows


def paired_table(rows: list[dict]) -> str:
  return html.markdown(
      ["source", "difference", "per run", "mean", "first better in"],
      ([row["source"], f"{row['key']}: {row['first']} - {row['second']}",
        ", ".join(f"{d:+.1f}" for d in row["differences"]), f"{row['mean']:+.2f}",
        f"{row['first_better']} of {row['n']}"] for row in rows))


def markdown_table(summary: dict[str, dict[str, float]]) -> str:
  return html.markdown(
      ["result", "mean", "std", "min", "max", "runs"],
      ([path, f"{s['mean']:.2f}", f"{s['std']:.2f}", f"{s['min']:.2f}", f"{s['max']:.2f}",
        f"{s['n']}" if s["n"] == s.get("runs", s["n"]) else f"{s['n']} of {s['runs']}"]
       for path, s in summary.items()))


def counts_table(counts: dict[str, dict[str, int]]) -> str:
  return html.markdown(["label", "runs per value"],
                       ([path, ", ".join(f"{v}: {n}" for v, n in counter.items())]
                        for path, counter in counts.items()))


def main(argv: list[str]) -> int:
  if len(argv) < 2:
    print(__doc__, file=sys.stderr)
    return 2
  results = []
  for workdir in argv[1:]:
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
      print(f"error: {path}: not found (is {workdir} a linfjax run directory?)", file=sys.stderr)
      return 2
    try:
      with open(path) as f:
        results.append(json.load(f))
    except (OSError, ValueError) as e:
      print(f"error: {path}: not readable JSON ({e}); rerun that run", file=sys.stderr)
      return 2
  summary = summarize(results)
  print(markdown_table(summary))
  partial = [path for path, s in summary.items() if s["n"] < s["runs"]]
  if partial:
    print(f"\n{len(partial)} rows average only the runs that have the number (for example "
          "prune.synthetic.* where a run skipped it): see the 'runs' column.")
  paired = paired_differences(results)
  if paired:
    print("\nPaired per-run differences of the paper's defense (ASR: lower is better; CA and "
          "DER: higher):\n" + paired_table(paired))
  counts = categorical_counts(results)
  if counts:
    print("\nLabels (seeds and class indices), counted rather than averaged:\n"
          + counts_table(counts))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
