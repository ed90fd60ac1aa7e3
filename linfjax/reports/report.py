"""The run report: one self-contained HTML file that tells a person what a run did.

`write_report(workdir)` reads the run's `config.json` and `results.json` (METHOD.md's
results contract) and writes `WORKDIR/report.html`: the config, CA/ASR/RA before and
after the defenses, the activation-norm table, Grad-CAM attention, the reverse
engineering outcome, the pruning results at r*, and every PNG of the run embedded as a
base64 data URI (each stage's figures under its section, others at the end). Keys a
stage did not produce are left out with a note, so the report works after any subset
of stages.
"""

from __future__ import annotations

import base64
import html
import json
import os
from typing import Any, Iterable, Sequence

from linfjax import defenses
from linfjax.detection import outliers

REPORT_FILE = "report.html"
STAGE_SECTIONS = (("train", "Training"), ("reverse", "Reverse engineering (Neural Cleanse)"),
                  ("analysis", "Activation norms and Grad-CAM"),
                  ("prune", "Defenses: lp-based pruning and Fine-Pruning"))
STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 80em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; } td.text, th.text { text-align: left; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: small; }
img { max-width: 100%; } .note { color: #a33; } pre { background: #f6f6f6; padding: 1em; }
"""


def _escape(value: Any) -> str:
  return html.escape(str(value))


def _number(value: Any, digits: int = 2) -> str:
  if isinstance(value, bool) or value is None:
    return _escape("-" if value is None else value)
  if isinstance(value, int):
    return str(value)
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return _escape(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, text_columns: int = 1,
           digits: int = 2) -> str:
  """An HTML table; the first `text_columns` columns are left-aligned labels."""
  def cell(tag, i, value):
    css = ' class="text"' if i < text_columns else ""
    return f"<{tag}{css}>{value}</{tag}>"
  head = "".join(cell("th", i, _escape(h)) for i, h in enumerate(header))
  body = "".join("<tr>" + "".join(cell("td", i, _escape(v) if i < text_columns else
                                       _number(v, digits)) for i, v in enumerate(row))
                 + "</tr>" for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _note(text: str) -> str:
  return f'<p class="note">{_escape(text)}</p>'


def _image(path: str, caption: str) -> str:
  with open(path, "rb") as f:
    data = base64.b64encode(f.read()).decode("ascii")
  return (f'<figure><img src="data:image/png;base64,{data}" alt="{_escape(caption)}">'
          f"<figcaption>{_escape(caption)}</figcaption></figure>")


def _pngs(directory: str) -> list[str]:
  """Every PNG under `directory`, sorted."""
  found = []
  for root, _, files in os.walk(directory):
    found += [os.path.join(root, name) for name in files if name.lower().endswith(".png")]
  return sorted(found)


def _train_section(entry: dict, config: dict, results: dict) -> str:
  del config, results
  rows = [(kind, *(entry[kind].get(key) for key in ("CA", "ASR", "RA")))
          for kind in ("backdoored", "vanilla") if kind in entry]
  counts = f"poisoned training images: {entry.get('poisoned', '-')}, clean set S: " \
           f"{entry.get('clean_set', '-')} images"
  return _table(["model", "CA", "ASR", "RA"], rows) + f"<p>{_escape(counts)}</p>"


def _verdict(values: dict) -> str:
  flagged, suspect = values.get("flagged"), values.get("suspect")
  if flagged is not None:
    return f"class {flagged} flagged"
  if suspect is not None:
    return f"no class flagged; most suspicious class {suspect}"
  return "no class flagged and none reached the attack-success threshold"


def _reverse_section(entry: dict, config: dict, results: dict) -> str:
  del results
  reverse = config.get("reverse", {})
  statistic = reverse.get("statistic", outliers.Settings().statistic)
  known = outliers.STATISTICS.get(statistic)
  threshold = outliers.threshold(statistic, reverse.get("anomaly_threshold", 0.0)) if known \
      else "-"
  meaning = f" ({known.description})" if known else ""
  parts = [f"<p>Backdoored model: <b>{_escape(_verdict(entry))}</b>. A class is flagged when "
           f"its <code>{_escape(statistic)}</code> index{_escape(meaning)} exceeds "
           f"{_escape(threshold)} with its mask norm below the median; whether or not one is, "
           "the defense uses the most suspicious class's trigger (the smallest mask that "
           "reached the attack-success threshold).</p>"]
  if "recovery" in entry:
    recovered = entry["recovery"]
    rows = [(role, values["class"], values["share"], values["iou"])
            for role, values in recovered.items() if isinstance(values, dict)]
    parts.append(f"<p>Trigger recovery: how much of each mask lies on the real trigger's "
                 f"{recovered['region_pixels']} pixels (outlined in red on the masks below). "
                 "Share: the mask's mass inside the region; IoU: the overlap of its "
                 f"{recovered['region_pixels']} largest pixels with the region. A share near 0 "
                 "means the synthetic trigger is not the real one, though it flips the "
                 "model.</p>" + _table(["class", "index", "share in region", "IoU"], rows))
  models = {"backdoored": entry, **({"vanilla": entry["vanilla"]} if "vanilla" in entry else {})}
  for kind, values in models.items():
    norms = values.get("mask_l1", [])
    columns = [("anomaly index (nc)", values.get("anomaly_index", []))]
    columns += [(f"index ({key[:-len('_index')]})", values[key]) for key in sorted(values)
                if key.endswith("_index") and key != "anomaly_index"]
    succeeded = values.get("succeeded", [True] * len(norms))
    rows = [(str(c), norms[c], *(column[c] if c < len(column) else None for _, column in columns),
             "yes" if succeeded[c] else "no") for c in range(len(norms))]
    parts.append(f"<h3>{_escape(kind)} model: {_escape(_verdict(values))}</h3>"
                 + _table(["class", "mask l1", *(name for name, _ in columns),
                           "reached the threshold"], rows))
  return "".join(parts)


def _analysis_section(entry: dict, config: dict, results: dict) -> str:
  del config, results
  rows = []
  for kind in ("backdoored", "vanilla"):
    for layer, per_norm in entry.get(kind, {}).items():
      for norm, summary in per_norm.items():
        rows.append((kind, layer, norm, summary.get("z"), summary.get("top1_share"),
                     summary.get("rel")))
  parts = ["<h3>Trigger-induced norm shifts (real trigger)</h3>",
           _table(["model", "layer", "norm", "z", "top1_share", "rel"], rows, text_columns=3,
                  digits=3) if rows else _note("no norm summaries")]
  attention = entry.get("attention", {})
  if attention:
    conditions = []
    for values in attention.values():
      conditions += [c for c in values if c not in conditions]
    rows = [(kind, *(values.get(c) for c in conditions)) for kind, values in attention.items()]
    parts += ["<h3>Grad-CAM trigger attention</h3>",
              _table(["model", *conditions], rows, digits=3)]
  return "".join(parts)


def _prune_section(entry: dict, config: dict, results: dict) -> str:
  settings = config.get("prune", {})
  parts = [f"<p>r*: the smallest pruning level whose defender-side ASR on S is at most "
           f"{_escape(settings.get('tau', '-'))} % with a clean-accuracy drop on S of at most "
           f"{_escape(settings.get('delta', '-'))} points (else the lowest ASR within the "
           f"drop), chosen on S only; r* counts pruned neurons (of layer "
           f"{_escape(settings.get('layer') or 'L, the last conv map before pooling')}, or of "
           "all pruned layers). Fine-Pruning's level is its own: "
           f"{_escape(settings.get('fine_pruning', {}).get('level', '-'))}. The curves show the "
           "sweeps before fine-tuning.</p><ul>"]
  shown = dict.fromkeys(name for source in ("synthetic", "real")
                        for name in entry.get(source, {}) if name != "skipped")
  parts += [f"<li><b>{_escape(name)}</b>: {_escape(defenses.DEFENSES[name].description)}</li>"
            for name in shown if name in defenses.DEFENSES]
  parts.append("</ul>")
  keys = ("r_star", "CA", "ASR_real", "ASR_defender", "dCA", "dASR", "DER")
  for source in ("synthetic", "real"):
    values = entry.get(source)
    heading = {"synthetic": "synthetic trigger (the realistic setting)",
               "real": "real trigger (analysis only)"}[source]
    parts.append(f"<h3>{_escape(heading)}</h3>")
    if source == "synthetic" and "reverse" in results:
      reverse = results["reverse"]
      parts.append(f"<p>The defender's trigger is class {_escape(reverse.get('suspect'))}'s: "
                   + ("flagged by Neural Cleanse." if reverse.get("flagged") is not None else
                      "<b>not flagged</b> by Neural Cleanse; the most suspicious class's "
                      "trigger is used all the same.") + "</p>")
    if values is None:
      parts.append(_note("not run"))
    elif "skipped" in values:
      parts.append(_note(f"skipped: {values['skipped']}"))
    else:
      rows = [(method, *(numbers.get(k) for k in keys)) for method, numbers in values.items()]
      parts.append(_table(["method", *keys], rows))
  return "".join(parts)


SUMMARY_HEADER = ("model", "r*", "CA", "ASR", "RA")


def _summary_rows(results: dict) -> list[tuple]:
  """CA/ASR/RA before, and CA/ASR after each defense at r*."""
  rows = [(f"{kind}, no defense", "-", *(values.get(k) for k in ("CA", "ASR", "RA")))
          for kind, values in results.get("train", {}).items()
          if kind in ("backdoored", "vanilla")]
  for source, values in results.get("prune", {}).items():
    for method, numbers in values.items():
      if isinstance(numbers, dict):
        rows.append((f"{method} ({source} trigger)", numbers.get("r_star"), numbers.get("CA"),
                     numbers.get("ASR_real"), None))
  return rows


def _summary(results: dict) -> str:
  if "backdoored" not in results.get("train", {}):
    return _note("no trained model: the train stage has not finished")
  return _table(SUMMARY_HEADER, _summary_rows(results))


def summary_text(workdir: str, results: dict) -> str:
  """What a finished run prints: the verdict, the summary table, and where the files are."""
  rows = [tuple(_number(v) if not isinstance(v, str) else v for v in row)
          for row in _summary_rows(results)]
  widths = [max(len(str(row[i])) for row in [SUMMARY_HEADER, *rows])
            for i in range(len(SUMMARY_HEADER))]
  lines = ["  ".join(str(cell).ljust(width) if i == 0 else str(cell).rjust(width)
                     for i, (cell, width) in enumerate(zip(row, widths))).rstrip()
           for row in [SUMMARY_HEADER, *rows]]
  if "reverse" in results:
    lines.insert(0, f"Neural Cleanse on the backdoored model: {_verdict(results['reverse'])}")
  lines += [f"prune, {source} trigger: skipped: {values['skipped']}"
            for source, values in results.get("prune", {}).items() if "skipped" in values]
  lines.append(f"Every number: {os.path.join(workdir, 'results.json')}; tables and figures: "
               f"{os.path.join(workdir, REPORT_FILE)}")
  return "\n".join(lines)


SECTION_BUILDERS = {"train": _train_section, "reverse": _reverse_section,
                    "analysis": _analysis_section, "prune": _prune_section}


def render(workdir: str, config: dict, results: dict) -> str:
  """The report's HTML for a run directory, its config and its results."""
  parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>linfjax run "
           f"{_escape(os.path.basename(os.path.abspath(workdir)))}</title>"
           f"<style>{STYLE}</style></head><body>",
           f"<h1>linfjax run report</h1><p>work directory: <code>"
           f"{_escape(os.path.abspath(workdir))}</code>, seed {_escape(results.get('seed', '-'))}"
           "</p>", "<h2>Summary: before and after the defenses (test split, %)</h2>",
           _summary(results)]
  shown = set()
  for stage, title in STAGE_SECTIONS:
    parts.append(f"<h2>{_escape(title)}</h2>")
    if stage in results:
      parts.append(SECTION_BUILDERS[stage](results[stage], config, results))
    else:
      parts.append(_note(f"the {stage} stage has not run (or not finished)"))
    for path in _pngs(os.path.join(workdir, stage)):
      parts.append(_image(path, os.path.relpath(path, workdir)))
      shown.add(path)
  others = [path for path in _pngs(workdir) if path not in shown]
  if others:
    parts.append("<h2>Other figures</h2>")
    parts += [_image(path, os.path.relpath(path, workdir)) for path in others]
  parts += ["<h2>Config</h2><pre>", _escape(json.dumps(config, indent=1)), "</pre>",
            "</body></html>"]
  return "\n".join(parts)


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def write_report(workdir: str) -> str:
  """Writes `WORKDIR/report.html` from the run's files; returns its path."""
  config = _read_json(os.path.join(workdir, "config.json"))
  results = _read_json(os.path.join(workdir, "results.json"))
  path = os.path.join(workdir, REPORT_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(render(workdir, config, results))
  os.replace(tmp, path)
  return path
