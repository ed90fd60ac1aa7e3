"""Figures a person looks at: norm-shift histograms, activation maps, Grad-CAM panels,
pruning curves, heat maps of a table.

Each function takes plain arrays and returns a matplotlib `Figure` drawn on the Agg
canvas (no pyplot, no display, no global backend switch); `save` writes one as PNG.
Nothing here knows about stages or runs.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib import patheffects
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from linfjax import files

MODEL_COLORS = {"backdoored": "tab:red", "vanilla": "tab:blue"}
_OUTLINE = [patheffects.withStroke(linewidth=1.5, foreground="black")]


def _figure(width: float, height: float) -> Figure:
  figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
  FigureCanvasAgg(figure)
  return figure


def save(figure: Figure, path: str) -> str:
  """Writes `figure` as a PNG at `path`, atomically (grid shards may write at once)."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png")
  files.write_bytes(path, buffer.getvalue())
  return path


def shift_histograms(shifts: Mapping[str, Mapping[str, np.ndarray]], *, title: str,
                     bins: int = 40) -> Figure:
  """One panel per norm: the histogram of per-neuron shifts `delta_k`, one colour per model.

  Args:
    shifts: model name (e.g. 'backdoored', 'vanilla') -> norm name -> [K] shifts.
    title: the figure's title (layer and trigger).
    bins: histogram bins, shared by the models within a panel.
  """
  norms = list(next(iter(shifts.values())))
  figure = _figure(4.0 * len(norms), 3.2)
  for i, norm in enumerate(norms):
    axes = figure.add_subplot(1, len(norms), i + 1)
    values = np.concatenate([np.asarray(per_norm[norm]).ravel() for per_norm in shifts.values()])
    edges = np.histogram_bin_edges(values, bins=bins)
    for model, per_norm in shifts.items():
      axes.hist(np.asarray(per_norm[norm]).ravel(), bins=edges, alpha=0.55, label=model,
                color=MODEL_COLORS.get(model))
    axes.set_title(norm)
    axes.set_xlabel("shift of the mean norm (triggered - clean)")
    axes.set_ylabel("neurons")
    axes.legend(fontsize="small")
  figure.suptitle(title)
  return figure


def activation_maps(clean_images: np.ndarray, triggered_images: np.ndarray,
                    clean_maps: np.ndarray, triggered_maps: np.ndarray,
                    neurons: Sequence[int], *, title: str) -> Figure:
  """Activation maps of chosen neurons, each image clean and triggered, on a shared scale.

  Args:
    clean_images, triggered_images: [n, H, W, C] in [0, 1].
    clean_maps, triggered_maps: [n, len(neurons), H', W'] activation maps.
    neurons: the neurons' indices in the layer (column titles).
    title: the figure's title.
  """
  rows = [(image, maps, label) for i in range(len(clean_images))
          for image, maps, label in ((clean_images[i], clean_maps[i], "clean"),
                                     (triggered_images[i], triggered_maps[i], "triggered"))]
  columns = 1 + len(neurons)
  figure = _figure(1.6 * columns, 1.6 * len(rows))
  scale = max(float(np.max(clean_maps)), float(np.max(triggered_maps)), 1e-12)
  for r, (image, maps, label) in enumerate(rows):
    axes = figure.add_subplot(len(rows), columns, r * columns + 1)
    axes.imshow(np.clip(image, 0.0, 1.0))
    axes.set_ylabel(label, fontsize="small")
    axes.set_xticks([])
    axes.set_yticks([])
    for c, neuron in enumerate(neurons):
      axes = figure.add_subplot(len(rows), columns, r * columns + c + 2)
      axes.imshow(maps[c], cmap="viridis", vmin=0.0, vmax=scale)
      axes.set_axis_off()
      if r == 0:
        axes.set_title(f"neuron {neuron}", fontsize="small")
  figure.suptitle(title)
  return figure


def gradcam_panels(images: Mapping[str, np.ndarray],
                   maps: Mapping[str, Mapping[str, np.ndarray]], *, title: str) -> Figure:
  """Grad-CAM overlays: a row per (model, image), a column per input condition.

  Args:
    images: condition (e.g. 'clean', 'real', 'synthetic') -> [n, H, W, C] in [0, 1].
    maps: model name -> condition -> [n, H, W] Grad-CAM maps in [0, 1].
    title: the figure's title.
  """
  conditions = list(images)
  num_images = len(next(iter(images.values())))
  rows = [(model, i) for model in maps for i in range(num_images)]
  figure = _figure(2.0 * len(conditions), 2.0 * len(rows))
  for r, (model, i) in enumerate(rows):
    for c, condition in enumerate(conditions):
      axes = figure.add_subplot(len(rows), len(conditions), r * len(conditions) + c + 1)
      axes.imshow(np.clip(images[condition][i], 0.0, 1.0))
      axes.imshow(maps[model][condition][i], cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
      axes.set_xticks([])
      axes.set_yticks([])
      if r == 0:
        axes.set_title(condition, fontsize="small")
      if c == 0:
        axes.set_ylabel(f"{model} {i}", fontsize="small")
  figure.suptitle(title)
  return figure


METHOD_COLORS = {"linf": "tab:red", "l2": "tab:blue", "l1": "tab:green",
                 "fine_pruning": "tab:gray"}
PRUNING_PANELS = (("CA", "CA on the test split (%)"),
          ("ASR_real", "ASR, real trigger, test split (%)"),
          ("ASR_defender", "ASR, defender's trigger, S (%)"))
# What a sweep evaluated on the defender's clean set S alone shows (multi-layer pruning).
CLEAN_SET_PANELS = (("CA_S", "CA on S (%)"), ("ASR_defender", "ASR, defender's trigger, S (%)"))


def pruning_curves(curves: Mapping[str, Mapping[str, np.ndarray]],
                   chosen: Mapping[str, int], *, title: str,
                   panels: Sequence[tuple[str, str]] = PRUNING_PANELS,
                   xlabel: str = "pruned share of the layer's neurons") -> Figure:
  """One panel per key of `panels` against the pruned share, a line per method, r* marked.

  Args:
    curves: method (e.g. 'linf', 'fine_pruning') -> 'fractions' (its [levels] pruned shares;
      methods may sweep different levels, e.g. ANP's threshold sweep) and each panel key
      (e.g. 'CA', 'ASR_real', 'ASR_defender') -> [levels] percentages.
    chosen: method -> index of its r* level.
    title: the figure's title (the trigger source).
    panels: (key, axis label) pairs; the default shows test CA, test ASR under the real
      trigger and the defender-side ASR on S.
    xlabel: what `fractions` measure.
  """
  figure = _figure(4.4 * len(panels), 3.8)
  for p, (key, label) in enumerate(panels):
    axes = figure.add_subplot(1, len(panels), p + 1)
    for method, values in curves.items():
      color = METHOD_COLORS.get(method)
      fractions = values["fractions"]
      axes.plot(fractions, values[key], marker=".", markersize=3, label=method, color=color)
      if method in chosen:
        i = chosen[method]
        axes.plot([fractions[i]], [values[key][i]], marker="o", markersize=8,
                  markerfacecolor="none", color=color)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(label)
    axes.set_ylim(-2, 102)
    axes.grid(alpha=0.3)
    if p == 0:
      axes.legend(fontsize="small", title="circles: r*", title_fontsize="small")
  figure.suptitle(title)
  return figure


def mean_ci_lines(x: Sequence, panels: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
                  *, xlabel: str, title: str) -> Figure:
  """One panel per percentage: a line per group through its means, error bars = CI half-widths.

  Args:
    x: [points] the x values; numbers give a numeric axis, anything else evenly spaced
      categories labelled with `str`.
    panels: panel's y label (e.g. 'CA (%)'; the axis spans 0-100) -> line label (e.g.
      'trigger=patch') -> ([points] means, [points] CI half-widths); a NaN mean leaves a
      gap, a NaN half-width (fewer than two runs) draws no bar.
    xlabel: the x axis's label.
    title: the figure's title.
  """
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x)
  positions = np.asarray(x, float) if numeric else np.arange(len(x), dtype=float)
  figure = _figure(4.4 * len(panels), 3.6)
  for p, (ylabel, lines) in enumerate(panels.items()):
    axes = figure.add_subplot(1, len(panels), p + 1)
    for label, (means, half_widths) in lines.items():
      axes.errorbar(positions, means, yerr=np.nan_to_num(np.asarray(half_widths, float)),
                    marker="o", markersize=4, capsize=3, label=label)
    if not numeric:
      axes.set_xticks(positions, [str(v) for v in x])
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_ylim(-2, 102)
    axes.grid(alpha=0.3)
    if p == 0:
      axes.legend(fontsize="small")
  figure.suptitle(title)
  return figure


def heatmap(values: np.ndarray, texts: Sequence[Sequence[str]], rows: Sequence[str],
            columns: Sequence[str], *, title: str, cmap: str = "viridis") -> Figure:
  """A table of percentages as coloured cells (0-100), each labelled with its text.

  Args:
    values: [rows, columns] numbers; NaN where a cell has none: drawn grey and hatched.
    texts: [rows][columns] each cell's label (the number, or why there is none).
    rows, columns: the labels along the y and the x axis.
    title: the figure's title.
    cmap: a matplotlib colormap name for the numbers.
  """
  values = np.asarray(values, float)
  figure = _figure(1.2 + 1.1 * len(columns), 1.3 + 0.55 * len(rows))
  axes = figure.add_subplot(1, 1, 1)
  image = axes.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=100.0,
                      aspect="auto")
  for i, j in zip(*np.nonzero(np.isnan(values))):
    axes.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.85", edgecolor="0.55",
                             hatch="//", linewidth=0))
  for i in range(values.shape[0]):
    for j in range(values.shape[1]):
      axes.text(j, i, texts[i][j], ha="center", va="center", fontsize="x-small",
                color="black" if np.isnan(values[i, j]) else "white",
                path_effects=None if np.isnan(values[i, j]) else _OUTLINE)
  axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
  axes.set_yticks(range(len(rows)), rows)
  figure.colorbar(image, ax=axes, fraction=0.04)
  axes.set_title(title)
  return figure
