"""A grid's attacks x defenses (configs/grid_bench.py): a cell per group and defense over the
seeds the grid plans, and the reason wherever a cell has no number.

    python -m linfjax.reports.defense_table GRID_DIR --bench [--source=synthetic]
        [--methods=linf,anp,...] [--out=DIR]

A row per combination of the grid's non-seed axes (grid.json; in the bench grid, one per
attack), marked "(clean-label)" when its runs' config.json set `trigger.clean_label`, then
how many of its planned runs finished, the classes Neural Cleanse flagged (counts over those
runs; null: none flagged), and a column per defense: "no defense" (the backdoored model,
results.json's `train.backdoored`) and each defense of `prune.<source>`, in the order the runs'
config.json (`prune.defenses`, or `prune.real_defenses` for the real trigger) and results.json
name them, or `--methods`'s. A cell is "CA / ASR / DER" after the defense ("CA / ASR" without
one): test CA, ASR under the attack's trigger and BackdoorBench's DER, each the mean over the
seeds whose results.json has it, followed by "(2/3 seeds)" when fewer seeds than planned
stand behind it. Where the runs give no number, the cell says why, read from their files:
  "missing (0/3 seeds run)"             no run of the row has finished yet (a grid resumes);
  "not applicable: REASON"              results.json skipped the defense, or its whole trigger
                                        source, and recorded REASON (`skipped`);
  "not run: not in the run's defenses"  a finished run's results.json lacks the defense.
A cell mixing these joins them with "; ", each with its seeds.
`write` puts defense_table.md, defense_table.html and the heat maps
figures/heatmap.{CA,ASR_real,DER}.png (rows x columns of the table, the means coloured on
0-100, a cell without a number grey and hatched and labelled "missing", "n/a" or "-") in OUT.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from linfjax import errors, files
from linfjax.reports import figures, grid_runs, html

NO_DEFENSE = "no defense"
TRAINING_DEFENSE = "abl"  # Trained in the train stage (results.json train.abl), not a prune one.
SEED_AXIS = "seed"
# results.json key -> (heat map title, colormap): CA after, ASR after (real trigger), DER.
METRICS = {"CA": ("CA after the defense (%)", "viridis"),
           "ASR_real": ("ASR after the defense (%)", "viridis_r"),
           "DER": ("DER (%)", "viridis")}
MARKDOWN_FILE = "defense_table.md"
HTML_FILE = "defense_table.html"
NOT_RUN = "not run: not in the run's defenses"
_CONFIG_KEYS = {"synthetic": "defenses", "real": "real_defenses"}
LEGEND = ("Cells: CA / ASR / DER after the defense (no defense: CA / ASR of the backdoored "
          "model), test split, mean over the seeds that have the number; \"(k/n seeds)\" when "
          "fewer than the n planned; where no number, why (from the runs' files).")


class BenchTableError(errors.UserError, ValueError):
  """The grid cannot be tabulated as asked (an unknown defense)."""


@dataclasses.dataclass
class Cell:
  """One group's runs under one defense: per metric the seeds' numbers, and why the others
  have none."""
  planned: int
  finished: int = 0
  values: dict[str, list[float]] = dataclasses.field(default_factory=dict)
  reasons: dict[str, int] = dataclasses.field(default_factory=dict)  # why -> runs

  def _seeds(self, count: int) -> str:
    return "" if count == self.planned else f" ({count}/{self.planned} seeds)"

  def mean(self, metric: str) -> float:
    numbers = self.values.get(metric, [])
    return float(np.mean(numbers)) if numbers else float("nan")

  def text(self) -> str:
    parts = []
    if self.values:
      parts.append(" / ".join(f"{self.mean(m):.1f}" for m in METRICS if m in self.values)
                   + self._seeds(max(map(len, self.values.values()))))
    parts += [reason + self._seeds(count) for reason, count in self.reasons.items()]
    return "; ".join(parts) or f"missing ({self.finished}/{self.planned} seeds run)"

  def label(self, metric: str) -> str:
    """The heat map's text: the mean (and its seeds when fewer), else why there is none."""
    count = len(self.values.get(metric, []))
    if count:
      return f"{self.mean(metric):.1f}" + ("" if count == self.planned
                                            else f"\n{count}/{self.planned} seeds")
    if not self.finished:
      return "missing"
    return "n/a" if self.reasons else "-"


@dataclasses.dataclass
class Table:
  """The table: a row per group, a column per defense ("no defense" first)."""
  axis: str  # the rows' heading: the non-seed axes
  columns: list[str]
  rows: list[str]  # each group's label
  seeds: list[str]  # "finished/planned" per row
  flagged: list[str]  # Neural Cleanse's flagged classes, counted per row
  cells: list[list[Cell]]  # [row][column]

  def heatmap(self, metric: str) -> tuple[np.ndarray, list[list[str]]]:
    """The means of `metric` [rows, columns] (NaN: none) and each cell's label."""
    return (np.array([[cell.mean(metric) for cell in row] for row in self.cells], float),
            [[cell.label(metric) for cell in row] for row in self.cells])


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError):
    return {}
  return value if isinstance(value, dict) else {}


def _numbers(tree: Any, keys: dict[str, str]) -> dict[str, float]:
  """{ours: tree[theirs]} for the keys whose value is a number."""
  tree = tree if isinstance(tree, dict) else {}
  return {ours: float(tree[theirs]) for ours, theirs in keys.items()
          if isinstance(tree.get(theirs), (int, float)) and not isinstance(tree[theirs], bool)}


def outcome(results: dict, source: str, column: str) -> dict[str, float] | str:
  """One finished run's numbers under `column` (a defense or NO_DEFENSE), or why none."""
  if column == NO_DEFENSE:
    return _numbers(results.get("train", {}).get("backdoored"), {"CA": "CA", "ASR_real": "ASR"})
  if column == TRAINING_DEFENSE:
    return (_numbers(results.get("train", {}).get(TRAINING_DEFENSE),
                     {"CA": "CA", "ASR_real": "ASR", "DER": "DER"})
            or "not run: abl.enabled was off")
  entry = results.get("prune", {}).get(source) if isinstance(results.get("prune"), dict) else None
  if not isinstance(entry, dict):
    return f"not run: results.json has no prune.{source}"
  for skipped in (entry, entry.get(column)):
    if isinstance(skipped, dict) and isinstance(skipped.get("skipped"), str):
      return f"not applicable: {skipped['skipped']}"
  if column not in entry:
    return NOT_RUN
  return _numbers(entry[column], {m: m for m in METRICS}) or "not run: no numbers in results.json"


def _defenses(configs: Sequence[dict], results: Sequence[dict], source: str) -> list[str]:
  """The defenses the runs name for `source`, configs first, in order of first mention."""
  named = [TRAINING_DEFENSE] if any(config.get("abl", {}).get("enabled") for config in configs) else []
  for config in configs:
    listed = config.get("prune", {}).get(_CONFIG_KEYS[source], [])
    named += [name for name in listed if isinstance(name, str)]
  for result in results:
    entry = result.get("prune", {}).get(source, {})
    named += [name for name in entry if name != "skipped"] if isinstance(entry, dict) else []
  return list(dict.fromkeys(named))


def _flagged(results: Sequence[dict]) -> str:
  counts = collections.Counter()
  for result in results:
    if isinstance(result.get("reverse"), dict) and "flagged" in result["reverse"]:
      value = result["reverse"]["flagged"]
      counts["null" if value is None else str(value)] += 1
  return ", ".join(f"{value}: {n}" for value, n in counts.items()) or "-"


def build(grid_dir: str, *, source: str = "synthetic", methods: Sequence[str] = ()) -> Table:
  """The table of the grid in `grid_dir` (see the module docstring).

  Raises:
    grid_runs.GridReportError: grid.json is missing or invalid.
    BenchTableError: a `methods` name no run of the grid names.
  """
  axes, listed = grid_runs.read_grid(grid_dir)
  fields = [field for field, _ in axes if field != SEED_AXIS]
  groups: dict[str, list[str]] = {}
  labels: dict[str, str] = {}
  configs: dict[str, dict] = {}
  results: dict[str, dict] = {}
  for name, values in listed:
    key = json.dumps([values[f] for f in fields])
    groups.setdefault(key, []).append(name)
    labels[key] = (str(values[fields[0]]) if len(fields) == 1 else
                   ", ".join(f"{f}={values[f]}" for f in fields) or "all runs")
    run_dir = os.path.join(grid_dir, "runs", name)
    configs[name] = _read(os.path.join(run_dir, "config.json"))
    if grid_runs.read_run(grid_dir, name, values).status == "finished":
      results[name] = _read(os.path.join(run_dir, "results.json"))
  available = _defenses(list(configs.values()), list(results.values()), source)
  unknown = [m for m in methods if m not in available]
  if unknown and available:
    raise BenchTableError(f"no run of {grid_dir} names the defense(s) {unknown} under "
                          f"prune.{source}; the grid has {available}")
  columns = [NO_DEFENSE, *(methods or available)]
  table = Table(", ".join(fields) or "runs", columns, [], [], [], [])
  for key, names in groups.items():
    done = [results[name] for name in names if name in results]
    clean_label = any(configs[name].get("trigger", {}).get("clean_label") is True
                      for name in names)
    table.rows.append(labels[key] + (" (clean-label)" if clean_label else ""))
    table.seeds.append(f"{len(done)}/{len(names)}")
    table.flagged.append(_flagged(done))
    row = []
    for column in columns:
      cell = Cell(planned=len(names), finished=len(done))
      for result in done:
        found = outcome(result, source, column)
        if isinstance(found, str):
          cell.reasons[found] = cell.reasons.get(found, 0) + 1
        for metric, value in (found.items() if isinstance(found, dict) else ()):
          cell.values.setdefault(metric, []).append(value)
      row.append(cell)
    table.cells.append(row)
  return table


def _header(table: Table) -> list[str]:
  return [table.axis, "seeds run", "NC flagged", f"{NO_DEFENSE} (CA / ASR)", *table.columns[1:]]


def _rows(table: Table) -> list[list[str]]:
  return [[label, seeds, flagged, *(cell.text() for cell in cells)]
          for label, seeds, flagged, cells in zip(table.rows, table.seeds, table.flagged,
                                                  table.cells)]


def markdown(table: Table) -> str:
  """The table as Markdown, a line per row."""
  return html.markdown(_header(table), _rows(table))


def write(table: Table, out_dir: str, *, title: str) -> list[str]:
  """Writes the heat maps, defense_table.md and defense_table.html to `out_dir`; their paths."""
  os.makedirs(os.path.join(out_dir, "figures"), exist_ok=True)
  pngs = []
  for metric, (name, cmap) in METRICS.items():
    values, texts = table.heatmap(metric)
    figure = figures.heatmap(values, texts, table.rows, table.columns, cmap=cmap,
                             title=f"{title}\n{name}, mean over seeds")
    pngs.append(figures.save(figure, os.path.join(out_dir, "figures", f"heatmap.{metric}.png")))
  text = f"# {title}\n\n{LEGEND}\n\n{markdown(table)}\n"
  paths = [os.path.join(out_dir, MARKDOWN_FILE), os.path.join(out_dir, HTML_FILE)]
  files.write_text(paths[0], text)
  body = (f"<h1>{html.escape(title)}</h1><p>{html.escape(LEGEND)}</p>"
          + html.table(_header(table), _rows(table), text_columns=3)
          + "".join(html.image(png, os.path.relpath(png, out_dir)) for png in pngs))
  files.write_text(paths[1], html.page(title, body))
  return [*paths, *pngs]
