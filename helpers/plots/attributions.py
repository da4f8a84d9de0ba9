"""method_comparison.png: for a few images, every attribution method's map for the true and for the predicted
class side by side. Only draws what it is given (helpers/model/attributions.py computes the maps)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure


@dataclass(frozen=True)
class MethodMaps:
    """One method's column pair: its maps (N, H, W) for the true and the predicted class of each image."""
    method: str
    true_maps: np.ndarray
    pred_maps: np.ndarray
    signed: bool              # signed maps are drawn red (for the class) / blue (against), centred on 0
    score: str = ""           # under the predicted-class column's header, e.g. "ROAD −0.210" (scored on it)


def _display(m: np.ndarray, signed: bool) -> np.ndarray:
    """Per-map scale for display: signed maps to [-1, 1] by their largest |value|, others min-max to [0, 1]."""
    m = np.asarray(m, np.float64)
    if signed:
        peak = np.abs(m).max()
        return m / peak if peak > 0 else m
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def _gray(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    return img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img


def plot_method_comparison(images: Sequence[np.ndarray], row_titles: Sequence[str], methods: Sequence[MethodMaps],
                           title: str = "Method comparison") -> Figure:
    """Rows = images (uint8 HWC), columns = the image, then per method its true-class and predicted-class map
    over the image. Each map is scaled on its own (compare where, not how strongly, across methods)."""
    n, k = len(images), len(methods)
    if not n or not k:
        fig = Figure(figsize=(6, 2.5), layout="constrained")
        ax = fig.add_subplot()
        ax.axis("off")
        ax.set_title(title)
        ax.text(0.5, 0.5, "no errors in the confused group to explain", ha="center", va="center", color="0.35")
        return fig
    ncols = 1 + 2 * k
    fig = Figure(figsize=(1.5 * ncols, 1.75 * n + 0.9), layout="constrained")
    axes = fig.subplots(n, ncols, squeeze=False)
    for r, img in enumerate(images):
        base = _gray(img)
        axes[r, 0].imshow(base, cmap="gray" if base.ndim == 2 else None)
        axes[r, 0].set_title(row_titles[r].replace(" · pred", "\npred"), fontsize=6.5)   # two short lines
        for j, mm in enumerate(methods):
            for c, maps in enumerate((mm.true_maps, mm.pred_maps)):
                ax = axes[r, 1 + 2 * j + c]
                ax.imshow(base, cmap="gray" if base.ndim == 2 else None, alpha=0.6)
                shown = _display(maps[r], mm.signed)
                if mm.signed:
                    ax.imshow(shown, cmap="RdBu_r", vmin=-1, vmax=1, alpha=0.65)
                else:
                    ax.imshow(shown, cmap="inferno", vmin=0, vmax=1, alpha=0.65)
                if r == 0:
                    extra = f"\n{mm.score}" if c == 1 and mm.score else ("\n" if mm.score else "")
                    ax.set_title(f"{mm.method}\n{'true' if c == 0 else 'predicted'}{extra}", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return fig
