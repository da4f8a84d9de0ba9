"""failure_modes_<pair>.png: one confused pair's failure modes, a row per mode: the mode's mean true-minus-
predicted CAM, then a mini gallery of its most typical errors, a caption with its numbers. Only draws what it is
given (compute/modes.py clusters, steps/model_modes.py picks the images)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

MAX_IMAGES = 4


@dataclass(frozen=True)
class ModeRow:
    """One mode: its caption, its mean true-minus-predicted CAM (H, W, in [-1, 1]) and up to MAX_IMAGES images
    (RGB uint8: overlays of the predicted class's CAM) with their titles."""
    caption: str
    mean_diff: np.ndarray
    images: Sequence[np.ndarray] = field(default_factory=list)
    titles: Sequence[str] = field(default_factory=list)


def plot_failure_modes(title: str, rows: Sequence[ModeRow], subtitle: str = "") -> Figure:
    """A row per mode: the mean difference map (red: the true class's CAM stronger, blue: the predicted
    class's), then the images; the caption above each row."""
    if not rows:
        fig = Figure(figsize=(6, 2), layout="constrained")
        ax = fig.add_subplot()
        ax.axis("off")
        ax.set_title(title)
        ax.text(0.5, 0.5, "no errors to describe", ha="center", va="center", color="0.35")
        return fig
    ncols = 1 + MAX_IMAGES
    fig = Figure(figsize=(2.0 * ncols, 2.35 * len(rows) + 0.5), layout="constrained")
    subfigs = fig.subfigures(len(rows), 1, squeeze=False)[:, 0]
    for sub, row in zip(subfigs, rows):
        axes = sub.subplots(1, ncols, squeeze=False)[0]
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
        im = axes[0].imshow(row.mean_diff, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        axes[0].set_title("mean CAM true − pred", fontsize=8)
        sub.colorbar(im, ax=axes[0], shrink=0.7, ticks=[-1, 0, 1]).ax.tick_params(labelsize=7)
        for ax, img, t in zip(axes[1:], row.images[:MAX_IMAGES], list(row.titles) + [""] * MAX_IMAGES):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(t, fontsize=7)
        sub.suptitle(row.caption, fontsize=9, ha="left", x=0.01)
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    return fig
