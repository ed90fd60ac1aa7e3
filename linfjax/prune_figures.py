"""Pruning curves: CA and ASR against the pruning level, one line per defense.

Like `linfjax.figures` (whose `save` writes them), the function takes plain arrays and
returns a matplotlib `Figure` on the Agg canvas; nothing here knows about stages.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

METHOD_COLORS = {"linf": "tab:red", "l2": "tab:blue", "l1": "tab:green",
                 "fine_pruning": "tab:gray"}
PANELS = (("CA", "CA on the test split (%)"),
          ("ASR_real", "ASR, real trigger, test split (%)"),
          ("ASR_defender", "ASR, defender's trigger, S (%)"))


def pruning_curves(fractions: np.ndarray, curves: Mapping[str, Mapping[str, np.ndarray]],
                   chosen: Mapping[str, int], *, title: str) -> Figure:
  """Three panels (test CA, test ASR under the real trigger, defender-side ASR on S)
  against the pruned share of the layer, a line per method, r* marked.

  Args:
    fractions: [levels] pruned share of the layer's neurons at each level.
    curves: method (e.g. 'linf', 'fine_pruning') -> {'CA', 'ASR_real', 'ASR_defender'}
      -> [levels] percentages.
    chosen: method -> index of its r* level.
    title: the figure's title (the trigger source).
  """
  figure = Figure(figsize=(4.4 * len(PANELS), 3.6), dpi=100, layout="constrained")
  FigureCanvasAgg(figure)
  for p, (key, label) in enumerate(PANELS):
    axes = figure.add_subplot(1, len(PANELS), p + 1)
    for method, values in curves.items():
      color = METHOD_COLORS.get(method)
      axes.plot(fractions, values[key], marker=".", markersize=3, label=method, color=color)
      if method in chosen:
        i = chosen[method]
        axes.plot([fractions[i]], [values[key][i]], marker="o", markersize=8,
                  markerfacecolor="none", color=color)
    axes.set_xlabel("pruned share of the layer's neurons")
    axes.set_ylabel(label)
    axes.set_ylim(-2, 102)
    axes.grid(alpha=0.3)
    if p == 0:
      axes.legend(fontsize="small", title="circles: r*", title_fontsize="small")
  figure.suptitle(title)
  return figure
