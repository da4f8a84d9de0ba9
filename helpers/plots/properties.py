"""property_slices.png: for the top confused pairs, the distributions of the image properties that separate a
class's errors from its correctly classified images. Only draws what it is given (compute/properties.py
measures and tests)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

ERROR_COLOUR, CORRECT_COLOUR = "#d62728", "#1f77b4"


@dataclass(frozen=True)
class SlicePanel:
    """One panel: a property's values on the errors and on the correct images of one comparison."""
    row: str                  # the comparison, e.g. "Pullover → Shirt"
    prop: str                 # the property's name, the x axis
    errors: np.ndarray
    correct: np.ndarray
    title: str                # e.g. "brightness: δ −0.61, AUC 0.20, BH p 3e-12"


def plot_property_slices(panels: Sequence[SlicePanel], title: str = "Which kinds of image go wrong") -> Figure:
    """Rows of panels (one row per comparison, in the order given), each an errors-vs-correct density of one
    property: density histograms over shared bins, medians dashed."""
    rows = list(dict.fromkeys(p.row for p in panels))
    if not rows:
        fig = Figure(figsize=(6, 2.5), layout="constrained")
        ax = fig.add_subplot()
        ax.axis("off")
        ax.set_title(title)
        ax.text(0.5, 0.5, "no comparison had enough errors to test", ha="center", va="center", color="0.35")
        return fig
    ncols = max(sum(p.row == r for p in panels) for r in rows)
    fig = Figure(figsize=(4.2 * ncols, 2.9 * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_visible(False)
    col_of: dict[str, int] = {}
    for p in panels:
        r = rows.index(p.row)
        c = col_of[p.row] = col_of.get(p.row, -1) + 1
        ax = axes[r, c]
        ax.set_visible(True)
        _density(ax, p.errors, p.correct)
        ax.set_title(p.title, fontsize=9)
        ax.set_xlabel(p.prop.replace("_", " "), fontsize=9)
        ax.set_ylabel(p.row if c == 0 else "", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.set_yticks([])
        ax.legend(fontsize=7, loc="upper right")   # "best" searches the artists: slow
    fig.suptitle(title)
    return fig


def _density(ax, errors: np.ndarray, correct: np.ndarray) -> None:
    """Both groups as density histograms over the same bins, so their heights compare directly. (Plain
    matplotlib: seaborn's histplot took ~0.17 s a panel, most of this step's time.)"""
    e, c = (np.asarray(v, np.float64) for v in (errors, correct))
    e, c = e[np.isfinite(e)], c[np.isfinite(c)]
    both = np.concatenate([e, c])
    edges = np.histogram_bin_edges(both, bins=30) if len(both) and np.ptp(both) > 0 else 30
    for values, label, colour in ((c, f"correct (n={len(c)})", CORRECT_COLOUR),
                                  (e, f"errors (n={len(e)})", ERROR_COLOUR)):
        if len(values):
            ax.hist(values, bins=edges, density=True, histtype="stepfilled", facecolor=to_rgba(colour, 0.3),
                    edgecolor=colour, linewidth=1.2, label=label)
            ax.axvline(np.median(values), color=colour, linestyle="--", linewidth=1)
