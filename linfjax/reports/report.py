"""The run report: one self-contained HTML file that tells a person what a run did.

`write_report(workdir)` reads the run's `config.json` and `results.json` (docs/method.md's
results contract) and writes `WORKDIR/report.html`: the config, CA/ASR/RA before and
after the defenses, the activation-norm table, Grad-CAM attention, the reverse
engineering outcome, the pruning results at r*, and every PNG of the run embedded as a
base64 data URI (each stage's figures under its section, others at the end). Keys a
stage did not produce are left out with a note, so the report works after any subset
of stages.
"""

from __future__ import annotations

import json
import os

from linfjax import defenses
from linfjax.detection import outliers
from linfjax.reports import html

REPORT_FILE = "report.html"
STAGE_TITLES = {"train": "Training", "reverse": "Reverse engineering (Neural Cleanse)",
                "analysis": "Activation norms and Grad-CAM",
                "prune": "Defenses: lp-based pruning and Fine-Pruning"}


def _train_section(entry: dict, config: dict, results: dict) -> str:
  del config, results
  rows = [(kind, *(entry[kind].get(key) for key in ("CA", "ASR", "RA")))
          for kind in ("backdoored", "vanilla") if kind in entry]
  counts = f"poisoned training images: {entry.get('poisoned', '-')}, clean set S: " \
           f"{entry.get('clean_set', '-')} images"
  if isinstance(entry.get("abl"), dict):
    abl = entry["abl"]
    rows.append(("ABL (trained on the poisoned set)", *(abl.get(k) for k in ("CA", "ASR", "RA"))))
    counts += (f"; ABL isolated {abl.get('isolated')} training images, "
               f"{abl.get('isolated_poisoned')} of them poisoned (DER {html.number(abl.get('DER'))})")
  return html.table(["model", "CA", "ASR", "RA"], rows) + f"<p>{html.escape(counts)}</p>"


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
  parts = [f"<p>Backdoored model: <b>{html.escape(_verdict(entry))}</b>. A class is flagged when "
           f"its <code>{html.escape(statistic)}</code> index{html.escape(meaning)} exceeds "
           f"{html.escape(threshold)} with its mask norm below the median; whether or not one is, "
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
                 "model.</p>" + html.table(["class", "index", "share in region", "IoU"], rows))
  models = {"backdoored": entry, **({"vanilla": entry["vanilla"]} if "vanilla" in entry else {})}
  for kind, values in models.items():
    norms = values.get("mask_l1", [])
    columns = [("anomaly index (nc)", values.get("anomaly_index", []))]
    columns += [(f"index ({key[:-len('_index')]})", values[key]) for key in sorted(values)
                if key.endswith("_index") and key != "anomaly_index"]
    succeeded = values.get("succeeded", [True] * len(norms))
    rows = [(str(c), norms[c], *(column[c] if c < len(column) else None for _, column in columns),
             "yes" if succeeded[c] else "no") for c in range(len(norms))]
    parts.append(f"<h3>{html.escape(kind)} model: {html.escape(_verdict(values))}</h3>"
                 + html.table(["class", "mask l1", *(name for name, _ in columns),
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
           html.table(["model", "layer", "norm", "z", "top1_share", "rel"], rows, text_columns=3,
                  digits=3) if rows else html.note("no norm summaries")]
  attention = entry.get("attention", {})
  if attention:
    conditions = []
    for values in attention.values():
      conditions += [c for c in values if c not in conditions]
    rows = [(kind, *(values.get(c) for c in conditions)) for kind, values in attention.items()]
    parts += ["<h3>Grad-CAM trigger attention</h3>",
              html.table(["model", *conditions], rows, digits=3)]
  return "".join(parts)


def _prune_section(entry: dict, config: dict, results: dict) -> str:
  settings = config.get("prune", {})
  parts = [f"<p>r*: the smallest pruning level whose defender-side ASR on S is at most "
           f"{html.escape(settings.get('tau', '-'))} % with a clean-accuracy drop on S of at most "
           f"{html.escape(settings.get('delta', '-'))} points (else the lowest ASR within the "
           f"drop), chosen on S only; r* counts pruned neurons (of layer "
           f"{html.escape(settings.get('layer') or 'L, the last conv map before pooling')}, or of "
           "all pruned layers). Fine-Pruning's level is its own: "
           f"{html.escape(settings.get('fine_pruning', {}).get('level', '-'))}. The curves show the "
           "sweeps before fine-tuning.</p><ul>"]
  shown = dict.fromkeys(name for source in ("synthetic", "real")
                        for name in entry.get(source, {}) if name != "skipped")
  parts += [f"<li><b>{html.escape(name)}</b>: {html.escape(defenses.DEFENSES[name].description)}</li>"
            for name in shown if name in defenses.DEFENSES]
  parts.append("</ul>")
  keys = ("r_star", "CA", "ASR_real", "ASR_defender", "dCA", "dASR", "DER")
  for source in ("synthetic", "real"):
    values = entry.get(source)
    heading = {"synthetic": "synthetic trigger (the realistic setting)",
               "real": "real trigger (analysis only)"}[source]
    parts.append(f"<h3>{html.escape(heading)}</h3>")
    if source == "synthetic" and "reverse" in results:
      reverse = results["reverse"]
      parts.append(f"<p>The defender's trigger is class {html.escape(reverse.get('suspect'))}'s: "
                   + ("flagged by Neural Cleanse." if reverse.get("flagged") is not None else
                      "<b>not flagged</b> by Neural Cleanse; the most suspicious class's "
                      "trigger is used all the same.") + "</p>")
    if values is None:
      parts.append(html.note("not run"))
    elif "skipped" in values:
      parts.append(html.note(f"skipped: {values['skipped']}"))
    else:
      rows = [(method, *(numbers.get(k) for k in keys)) for method, numbers in values.items()]
      parts.append(html.table(["method", *keys], rows))
  return "".join(parts)


SUMMARY_HEADER = ("model", "r*", "CA", "ASR", "RA")


def _summary_rows(results: dict) -> list[tuple]:
  """CA/ASR/RA before, and CA/ASR after each defense at r*."""
  rows = [(f"{kind}, no defense", "-", *(values.get(k) for k in ("CA", "ASR", "RA")))
          for kind, values in results.get("train", {}).items()
          if kind in ("backdoored", "vanilla")]
  if isinstance(results.get("train", {}).get("abl"), dict):
    rows.append(("ABL (training-time)", "-",
                 *(results["train"]["abl"].get(k) for k in ("CA", "ASR", "RA"))))
  for source, values in results.get("prune", {}).items():
    for method, numbers in values.items():
      if isinstance(numbers, dict):
        rows.append((f"{method} ({source} trigger)", numbers.get("r_star"), numbers.get("CA"),
                     numbers.get("ASR_real"), None))
  return rows


def _summary(results: dict) -> str:
  if "backdoored" not in results.get("train", {}):
    return html.note("no trained model: the train stage has not finished")
  return html.table(SUMMARY_HEADER, _summary_rows(results))


def summary_text(workdir: str, results: dict) -> str:
  """What a finished run prints: the verdict, the summary table, and where the files are."""
  rows = [tuple(html.number(v) if not isinstance(v, str) else v for v in row)
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
           f"{html.escape(os.path.basename(os.path.abspath(workdir)))}</title>"
           f"<style>{html.STYLE}</style></head><body>",
           f"<h1>linfjax run report</h1><p>work directory: <code>"
           f"{html.escape(os.path.abspath(workdir))}</code>, seed {html.escape(results.get('seed', '-'))}"
           "</p>", "<h2>Summary: before and after the defenses (test split, %)</h2>",
           _summary(results)]
  shown = set()
  for stage, title in STAGE_TITLES.items():
    parts.append(f"<h2>{html.escape(title)}</h2>")
    if stage in results:
      parts.append(SECTION_BUILDERS[stage](results[stage], config, results))
    elif stage not in config.get("stages", tuple(STAGE_TITLES)):
      parts.append(html.note(f"the {stage} stage was not asked for (config stages: "
                             f"{', '.join(config['stages'])})"))
    else:
      parts.append(html.note(f"the {stage} stage has not run (or not finished)"))
    for path in html.pngs(os.path.join(workdir, stage)):
      parts.append(html.image(path, os.path.relpath(path, workdir)))
      shown.add(path)
  others = [path for path in html.pngs(workdir) if path not in shown]
  if others:
    parts.append("<h2>Other figures</h2>")
    parts += [html.image(path, os.path.relpath(path, workdir)) for path in others]
  parts += ["<h2>Config</h2><pre>", html.escape(json.dumps(config, indent=1)), "</pre>",
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
