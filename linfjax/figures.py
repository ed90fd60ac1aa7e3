"""Figures a person looks at: norm-shift histograms, activation maps, Grad-CAM panels.

Each function takes plain arrays and returns a matplotlib `Figure` drawn on the Agg
canvas (no pyplot, no display, no global backend switch); `save` writes one as PNG.
Nothing here knows about stages or runs.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MODEL_COLORS = {"backdoored": "tab:red", "vanilla": "tab:blue"}


def _figure(width: float, height: float) -> Figure:
  figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
  FigureCanvasAgg(figure)
  return figure


def save(figure: Figure, path: str) -> str:
  """Writes `figure` as a PNG at `path`; returns the path."""
  figure.savefig(path, format="png")
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
