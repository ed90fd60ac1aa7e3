"""Mean and spread of results.json numbers across runs (for example, seeds of one config).

    python -m linfjax.summarize runs/quick_s0 runs/quick_s1 runs/quick_s2

prints one Markdown row per number in the runs' results.json files: its path
(`train.backdoored.ASR`), the mean, the sample standard deviation, the minimum,
the maximum and how many runs had it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Iterable


def flatten(tree, prefix: str = "") -> dict[str, float]:
  """Numeric leaves of nested dicts as {'a.b.c': value}; lists and strings are skipped."""
  leaves = {}
  if isinstance(tree, dict):
    for key, value in tree.items():
      leaves.update(flatten(value, f"{prefix}{key}."))
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    leaves[prefix[:-1]] = float(tree)
  return leaves


def summarize(results: Iterable[dict]) -> dict[str, dict[str, float]]:
  """Per leaf path: mean, std (sample, ddof 1; 0 for one run), min, max and n."""
  values: dict[str, list[float]] = {}
  for result in results:
    for path, value in flatten(result).items():
      values.setdefault(path, []).append(value)
  summary = {}
  for path, vals in values.items():
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    summary[path] = {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "n": n}
  return summary


def markdown_table(summary: dict[str, dict[str, float]]) -> str:
  lines = ["| result | mean | std | min | max | runs |", "| --- | --- | --- | --- | --- | --- |"]
  for path, s in summary.items():
    lines.append(f"| {path} | {s['mean']:.2f} | {s['std']:.2f} | {s['min']:.2f} | "
                 f"{s['max']:.2f} | {s['n']} |")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  if len(argv) < 2:
    print(__doc__, file=sys.stderr)
    return 2
  results = []
  for workdir in argv[1:]:
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
      print(f"{path}: not found (is {workdir} a linfjax run directory?)", file=sys.stderr)
      return 1
    with open(path) as f:
      results.append(json.load(f))
  print(markdown_table(summarize(results)))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
