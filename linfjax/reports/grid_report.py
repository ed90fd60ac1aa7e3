"""The grid report: many runs of the pipeline in one directory, tabulated and aggregated.

    python -m linfjax.reports.grid_report GRID_DIR

GRID_DIR holds `grid.json` (axes and runs) and a run directory per run, `runs/<name>/`,
with `error.json` in it when the run's last attempt failed. `write_grid_report` writes:
  grid.csv          a row per run (grid.json's order): `name`, `status`, a column per axis,
                    then every number of its results.json under its dotted path;
  aggregates.csv    a row per combination of the non-seed axes: the axes, `runs`,
                    `finished`, then per result column `<column>.n`, `.mean`, `.sd` (ddof 1)
                    and `.ci95` (Student-t 95 % CI half-width) over its finished runs;
  figures/*.png     CA and ASR against `poison.rate` (else the first non-seed axis), a line
                    per combination of the other non-seed axes: `train.backdoored.png`, and
                    `prune.<source>.<method>.png` per pruning method in results.json;
  grid_report.html  status counts, failed runs and why, headline aggregates, the figures
                    (embedded, as in linfjax/reports/report.py), a link to each run's report.html.
A run is `finished` when results.json holds every stage its config.json names, `failed`
when error.json exists or a file of it cannot be read, else `incomplete`; only finished
runs are aggregated. A list in results.json is a column per element (`...anomaly_index.0`),
null an empty cell not counted in n; strings and booleans are left out. Labels (`seed` and
class indices: `summarize.CATEGORICAL`, e.g. `reverse.flagged`) are shown per run but
never averaged: aggregates.csv counts their values per group in `<column>.counts`
("0: 2, null: 1"). n is the number of finished runs that have a number in a column, so a
column some runs lack (an older run's skipped `prune.synthetic`) says so by its n.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
import urllib.parse
from typing import Any, Sequence

import numpy as np
from absl import app, logging

from linfjax import files
from linfjax.reports import figures, html, report, summarize
from linfjax.reports.grid_runs import (STATS, STATUSES, Aggregate, GridReportError, Run,
                                       aggregate, read_grid, read_run)

GRID_CSV = "grid.csv"
AGGREGATES_CSV = "aggregates.csv"
HTML_FILE = "grid_report.html"
FIGURES_DIR = "figures"
SEED_AXIS = "seed"
TRAIN_HEADLINES = tuple(f"train.{m}.{k}" for m in ("backdoored", "vanilla") for k in ("CA", "ASR"))
PRUNE_SOURCES = ("synthetic", "real")
PRUNE_HEADLINES = ("CA", "ASR_real", "DER", "r_star")


def _cell(value: Any) -> str:
  """A CSV cell: empty for None, strings as they are, anything else as JSON writes it."""
  if value is None or isinstance(value, str):
    return value or ""
  return json.dumps(value, sort_keys=True)


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  buffer = io.StringIO()
  csv.writer(buffer, lineterminator="\n").writerows(
      [_cell(value) for value in row] for row in [header, *rows])
  files.write_text(path, buffer.getvalue())


def _methods(columns: Sequence[str], source: str) -> list[str]:
  """Pruning methods (norms, fine_pruning) with a CA column under prune.<source>."""
  return list(dict.fromkeys(column.split(".")[2] for column in columns
                            if re.fullmatch(rf"prune\.{source}\.[^.]+\.CA", column)))


def _write_figures(grid_dir: str, axes: Sequence[tuple[str, list]],
                   aggregates: Sequence[Aggregate], columns: Sequence[str]) -> tuple[list, str]:
  """CA and ASR against the x axis, before and after pruning; (PNG paths, note if none)."""
  fields = [field for field, _ in axes if field != SEED_AXIS]
  if not fields:
    return [], "The grid has no axis besides seed: no line plots."
  x_field = "poison.rate" if "poison.rate" in fields else fields[0]
  x_values = dict(axes)[x_field]
  if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x_values):
    x_values = sorted(x_values)
  lines: dict[str, dict[str, Aggregate]] = {}
  for row in aggregates:
    label = ", ".join(f"{f}={_cell(row.values[f])}" for f in fields if f != x_field)
    lines.setdefault(label or "all runs", {})[_cell(row.values[x_field])] = row

  def series(points, column):  # (means, CI half-widths) along x_values, NaN where none
    stats = [points[_cell(x)].stats.get(column, {}) if _cell(x) in points else {}
             for x in x_values]
    return tuple(np.array([np.nan if s.get(k) is None else s[k] for s in stats], float)
                 for k in ("mean", "ci95"))

  settings = [("train.backdoored", "backdoored model, no defense", "ASR")]
  settings += [(f"prune.{source}.{method}", f"after {method} pruning ({source} trigger)",
                "ASR_real") for source in PRUNE_SOURCES for method in _methods(columns, source)]
  os.makedirs(os.path.join(grid_dir, FIGURES_DIR), exist_ok=True)
  paths = []
  for prefix, title, asr in settings:
    panels = {ylabel: {label: series(points, f"{prefix}.{key}") for label, points in lines.items()}
              for key, ylabel in (("CA", "CA (%)"), (asr, "ASR, real trigger (%)"))}
    if all(np.isnan(means).all() for lines_ in panels.values() for means, _ in lines_.values()):
      continue
    figure = figures.mean_ci_lines(x_values, panels, xlabel=x_field,
                                   title=f"{title}; mean and 95 % CI over seeds")
    paths.append(figures.save(figure, os.path.join(grid_dir, FIGURES_DIR, f"{prefix}.png")))
  return paths, "" if paths else "No finished run has CA/ASR numbers yet: no line plots."


def _mean_ci_text(stats: dict[str, Any]) -> str:
  spread = "" if stats.get("ci95") is None else f" ± {stats['ci95']:.2f}"
  return f"{stats['mean']:.2f}{spread} ({stats['n']})" if stats.get("n") else "-"


def _aggregate_tables(aggregates: Sequence[Aggregate], fields: Sequence[str],
                      columns: Sequence[str]) -> str:
  """Headline metrics as "mean ± CI (n)": training, then each pruning source by method."""
  labels = [[html.escape(_cell(row.values[f])) for f in fields] + [f"{row.finished}/{row.runs}"]
            for row in aggregates]
  train = [c for c in TRAIN_HEADLINES if c in columns]
  parts = ["<h3>Before pruning</h3>",
           html.table([*fields, "finished/runs", *train],
                      [label + [_mean_ci_text(row.stats[c]) for c in train]
                       for label, row in zip(labels, aggregates)],
                      text_columns=len(fields) + 1, escaped=True)]
  for source in PRUNE_SOURCES:
    rows = [label + [html.escape(m)] + [_mean_ci_text(row.stats.get(f"prune.{source}.{m}.{k}",
                                                                    {}))
                                        for k in PRUNE_HEADLINES]
            for label, row in zip(labels, aggregates) for m in _methods(columns, source)]
    if rows:
      parts += [f"<h3>After pruning, {html.escape(source)} trigger</h3>",
                html.table([*fields, "finished/runs", "method", *PRUNE_HEADLINES], rows,
                           text_columns=len(fields) + 2, escaped=True)]
  return "".join(parts)


def render(grid_dir: str, axes: Sequence[tuple[str, list]], runs: Sequence[Run],
           aggregates: Sequence[Aggregate], columns: Sequence[str], pngs: Sequence[str],
           figure_note: str) -> str:
  """The grid report's HTML."""
  fields = [field for field, _ in axes]
  grouped = [field for field in fields if field != SEED_AXIS]
  failed = [run for run in runs if run.status == "failed"]
  axis_text = "; ".join(f"{html.escape(f)} ({html.escape(', '.join(map(_cell, values)))})"
                        for f, values in axes)
  parts = [f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>linfjax grid '
           f"{html.escape(os.path.basename(os.path.abspath(grid_dir)))}</title>"
           f"<style>{html.STYLE}</style></head><body><h1>linfjax grid report</h1>",
           f"<p>grid directory <code>{html.escape(os.path.abspath(grid_dir))}</code>; axes: "
           f"{axis_text}</p>", "<h2>Status</h2>",
           html.table(["status", "runs"], [[s, str(sum(r.status == s for r in runs))]
                                           for s in STATUSES], text_columns=1, escaped=True),
           "<h2>Failed runs</h2>"]
  parts.append(html.table(["run", "error", "message"], [
      [html.escape(r.name), html.escape(r.error), html.escape(r.message) + (
          f"<details><summary>traceback</summary><pre>{html.escape(r.traceback)}</pre></details>"
          if r.traceback else "")] for r in failed], text_columns=3, escaped=True)
               if failed else "<p>none</p>")
  parts += ["<h2>Aggregates over finished runs</h2>",
            f"<p>mean ± 95 % CI half-width (n: the finished runs that have the number; "
            f"fewer than finished where some runs lack it), grouped by "
            f"{html.escape(', '.join(grouped) or 'nothing (one group)')}; every number's n, mean, sd "
            f"and CI are in <code>{AGGREGATES_CSV}</code>, every run's in "
            f"<code>{GRID_CSV}</code>.</p>",
            _aggregate_tables(aggregates, grouped, columns), "<h2>Figures</h2>"]
  parts += [html.image(path, os.path.relpath(path, grid_dir)) for path in pngs]
  parts.append(f'<p class="note">{html.escape(figure_note)}</p>' if figure_note else "")
  links = []
  for run in runs:
    target = f"runs/{run.name}/{report.REPORT_FILE}"
    link = (f'<a href="{html.escape(urllib.parse.quote(target, safe="/=,"))}">report</a>'
            if os.path.exists(os.path.join(grid_dir, target)) else "no report yet")
    links.append([html.escape(run.name), run.status,
                  *(html.escape(_cell(run.values[f])) for f in fields), link])
  parts += ["<h2>Runs</h2>", html.table(["run", "status", *fields, "report"], links,
                                        text_columns=len(fields) + 3, escaped=True),
            "</body></html>"]
  return "\n".join(parts)


def write_grid_report(grid_dir: str) -> str:
  """Writes grid.csv, aggregates.csv, figures/ and grid_report.html; returns the html path.

  Raises:
    GridReportError: grid.json is missing or invalid (the message names the file and the
      problem). A run whose files cannot be read is reported as failed instead.
  """
  axes, listed = read_grid(grid_dir)
  runs = [read_run(grid_dir, name, values) for name, values in listed]
  fields = [field for field, _ in axes]
  columns = list(dict.fromkeys(c for run in runs for c in run.numbers
                               if c not in {"name", "status", *fields}))
  _write_csv(os.path.join(grid_dir, GRID_CSV), ["name", "status", *fields, *columns],
             [[run.name, run.status, *(run.values[f] for f in fields),
               *(run.numbers.get(c) for c in columns)] for run in runs])
  grouped = [field for field in fields if field != SEED_AXIS]
  measured = [c for c in columns if not summarize.is_categorical(c)]
  labels = [c for c in columns if summarize.is_categorical(c) and c != SEED_AXIS]
  aggregates = aggregate(runs, grouped, measured, labels)
  _write_csv(os.path.join(grid_dir, AGGREGATES_CSV),
             [*grouped, "runs", "finished", *(f"{c}.{s}" for c in measured for s in STATS),
              *(f"{c}.counts" for c in labels)],
             [[*(row.values[f] for f in grouped), row.runs, row.finished,
               *(row.stats[c][s] for c in measured for s in STATS),
               *(row.counts[c] for c in labels)] for row in aggregates])
  pngs, figure_note = _write_figures(grid_dir, axes, aggregates, measured)
  path = os.path.join(grid_dir, HTML_FILE)
  files.write_text(path, render(grid_dir, axes, runs, aggregates, measured, pngs, figure_note))
  logging.info("grid report %s: %s", path, ", ".join(
      f"{sum(r.status == s for r in runs)} {s}" for s in STATUSES))
  return path


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError("usage: python -m linfjax.reports.grid_report GRID_DIR")
  try:
    print(write_grid_report(argv[1]))
  except GridReportError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
