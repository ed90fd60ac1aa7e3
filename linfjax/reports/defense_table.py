"""One Markdown table of a grid's defenses side by side, from its aggregates.csv.

    python -m linfjax.reports.defense_table GRID_DIR [--source=synthetic] [--methods=linf,anp,...]
    python -m linfjax.reports.defense_table GRID_DIR --bench [--out=DIR] [--source=...] [--methods=...]

A row per combination of the grid's non-seed axes (aggregates.csv's groups, written by
`linfjax.reports.grid_report` at the end of every grid): finished runs of the group, the backdoored
model's CA and ASR before any defense, the classes Neural Cleanse flagged (counts over the
runs), then each defense's ASR after it, with its CA after in brackets. Every number is
"mean ± sd" over the group's finished runs (sample sd, ddof 1; the mean alone for one run).
The defenses are the pruning methods of `prune.<source>` in results.json's order (linf, l2,
l1, Fine-Pruning, ..., anp, clp, nc_unlearning), or those `--methods` names, in its order.
The HTML grid report shows the same numbers with 95 % CIs.

`--bench` turns the table around (linfjax/reports/bench_table.py; configs/grid_bench.py): a
row per group (attack), a column per defense, each cell CA / ASR / DER after the defense over
the seeds the grid plans, read from the runs' files rather than aggregates.csv, so that a
grid still running shows its missing cells, and a cell without a number says why. It prints
the Markdown and writes it with an HTML page and heat maps to DIR (default GRID_DIR).
An error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from typing import Sequence

from absl import app, flags

from linfjax import errors
from linfjax.reports import bench_table, grid_report, html

_SOURCE = flags.DEFINE_enum("source", "synthetic", list(grid_report.PRUNE_SOURCES),
                            "which trigger the defenses used")
_METHODS = flags.DEFINE_list("methods", [], "defenses to show, in order (default: all)")
_BENCH = flags.DEFINE_bool("bench", False, "a row per attack, a column per defense, over the "
                           "planned seeds, with heat maps (linfjax/reports/bench_table.py)")
_OUT = flags.DEFINE_string("out", "", "--bench: where to write the table and heat maps "
                           "(default: GRID_DIR)")


class DefenseTableError(errors.UserError, ValueError):
  """aggregates.csv is missing, or lacks what the table needs."""


def read_aggregates(grid_dir: str) -> list[dict[str, str]]:
  path = os.path.join(grid_dir, grid_report.AGGREGATES_CSV)
  if not os.path.exists(path):
    raise DefenseTableError(f"{path}: not found; a grid writes it when it ends (or run "
                            f"`python -m linfjax.reports.grid_report {grid_dir}`)")
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  if not rows or "runs" not in rows[0]:
    raise DefenseTableError(f"{path}: no groups, or not an aggregates.csv")
  return rows


def _mean_sd(row: dict[str, str], column: str) -> str:
  mean, sd = row.get(f"{column}.mean", ""), row.get(f"{column}.sd", "")
  if not mean:
    return "-"
  return f"{float(mean):.1f} ± {float(sd):.1f}" if sd else f"{float(mean):.1f}"


def markdown(rows: Sequence[dict[str, str]], *, source: str = "synthetic",
             methods: Sequence[str] = ()) -> str:
  """The table (see the module docstring) for aggregates.csv's `rows`."""
  header = list(rows[0])
  groups = header[:header.index("runs")]
  available = list(dict.fromkeys(
      match.group(1) for column in header
      if (match := re.fullmatch(rf"prune\.{source}\.([^.]+)\.CA\.mean", column))))
  unknown = [m for m in methods if m not in available]
  if unknown:
    raise DefenseTableError(f"no defense {unknown} under prune.{source}; the grid has "
                            f"{available or 'none'}")
  chosen = list(methods) or available
  table_rows = []
  for row in rows:
    cells = [row[g] for g in groups] + [row["finished"],
                                        _mean_sd(row, "train.backdoored.CA"),
                                        _mean_sd(row, "train.backdoored.ASR"),
                                        row.get("reverse.flagged.counts") or "-"]
    cells += [f"{_mean_sd(row, f'prune.{source}.{m}.ASR_real')} "
              f"({_mean_sd(row, f'prune.{source}.{m}.CA')})" for m in chosen]
    table_rows.append(cells)
  return html.markdown([*groups, "runs", "CA before", "ASR before", "flagged", *chosen],
                       table_rows)


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError("usage: python -m linfjax.reports.defense_table GRID_DIR [--source=...] "
                         "[--methods=...] [--bench [--out=DIR]]")
  try:
    if flags.FLAGS.is_parsed() and _BENCH.value:
      table = bench_table.build(argv[1], source=_SOURCE.value, methods=_METHODS.value)
      title = f"{os.path.basename(os.path.abspath(argv[1]))}: attacks x defenses"
      written = bench_table.write(table, _OUT.value or argv[1], title=title)
      print(bench_table.markdown(table))
      print("\nwrote " + ", ".join(written), file=sys.stderr)
    else:
      print(markdown(read_aggregates(argv[1]), source=_SOURCE.value, methods=_METHODS.value))
  except (errors.UserError, OSError) as e:
    error = errors.from_os_error(e) if isinstance(e, OSError) else e
    if error is None:
      raise
    print(f"error: {errors.one_line(error)}", file=sys.stderr)
    sys.exit(errors.EXIT_USER_ERROR)


if __name__ == "__main__":
  app.run(main)
