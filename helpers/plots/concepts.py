"""concepts.png: one row per NMF concept of the confused group's target-layer activations, its most activating
image patches (crops of the test images) with the concept's amount as a heat overlay. Only draws what it is given
(compute/concepts.py factorises and finds the patches)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from helpers.plots.overlay import overlay_many


@dataclass(frozen=True)
class ConceptRow:
    """One concept: its top patches as image crops (uint8 (h, w) / (h, w, 1|3)), the concept's amount over each
    crop (float in [0, 1], same h, w), a caption per patch and the row's title."""
    title: str                      # e.g. "concept 3: 58% of the Dress → Trouser margin"
    crops: Sequence[np.ndarray]
    heats: Sequence[np.ndarray]
    captions: Sequence[str]         # e.g. "#1234 Dress→Trouser"


def plot_concept_patches(rows: Sequence[ConceptRow], title: str = "Concepts of the confused group") -> Figure:
    """A grid: a row per concept, its patches left to right (strongest first), each with the heat overlay."""
    rows = [r for r in rows if len(r.crops)]
    if not rows:
        fig = Figure(figsize=(6, 2.0), layout="constrained")
        ax = fig.add_subplot()
        ax.axis("off")
        ax.set_title(title)
        ax.text(0.5, 0.5, "no concept was active in any image", ha="center", va="center", color="0.35")
        return fig
    ncols = max(len(r.crops) for r in rows)
    fig = Figure(figsize=(1.55 * ncols + 0.4, 1.9 * len(rows) + 0.7), layout="constrained")
    subfigs = fig.subfigures(len(rows), 1, squeeze=False)[:, 0]
    for sub, row in zip(subfigs, rows):
        axes = sub.subplots(1, ncols, squeeze=False)[0]
        # one call per patch: crops at the image border are smaller, and overlay_many needs one shape; the
        # image weighs 0.75 so the garment stays readable under the heat (at 0.5 the heat hid it)
        shown = [overlay_many([c], [h], image_weight=0.75)[0] for c, h in zip(row.crops, row.heats)]
        for c, ax in enumerate(axes):
            ax.axis("off")
            if c < len(row.crops):
                ax.imshow(shown[c], interpolation="nearest")
                ax.set_title(row.captions[c] if c < len(row.captions) else "", fontsize=7)
        sub.suptitle(row.title, fontsize=9, x=0.01, ha="left")
    fig.suptitle(title)
    return fig

