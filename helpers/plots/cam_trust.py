"""cam_trust.png: can these CAMs be trusted? One example image with its CAM, the CAM of the randomised model and
the Sobel edge map; the rank correlations behind the class-sensitivity and randomisation checks; the ROAD scores
of each CAM method beside the random-map and Sobel baselines. Only draws what it is given (model/cam_trust.py and
steps/cam_trust.py measure)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

METHOD_COLOUR, RANDOM_COLOUR, SOBEL_COLOUR = "#1f77b4", "#7f7f7f", "#ff7f0e"


@dataclass(frozen=True)
class TrustFigure:
    """What the figure shows. `example`: (panel title, RGB uint8 image) tiles, left to right. `correlations`:
    (label, per-image rank correlations, threshold above which it is flagged). `road`: (method, its score, the
    random maps' score, the Sobel maps' score)."""
    example_title: str = ""
    example: Sequence[tuple[str, np.ndarray]] = field(default_factory=list)
    correlations: Sequence[tuple[str, np.ndarray, float]] = field(default_factory=list)
    road: Sequence[tuple[str, float, float, float]] = field(default_factory=list)


def plot_cam_trust(fig_data: TrustFigure, title: str = "Can these CAMs be trusted?") -> Figure:
    """Top row: the example tiles. Bottom row: rank correlations as dots per check (thresholds dashed), and the
    ROAD scores as grouped bars (lower = more faithful)."""
    n_tiles = max(len(fig_data.example), 1)
    fig = Figure(figsize=(max(3.0 * n_tiles, 10), 7.2), layout="constrained")
    grid = fig.add_gridspec(2, n_tiles * 2, height_ratios=[1, 1.1])
    for k, (label, img) in enumerate(fig_data.example):
        ax = fig.add_subplot(grid[0, 2 * k:2 * k + 2])
        ax.imshow(img, interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    if not fig_data.example:
        ax = fig.add_subplot(grid[0, :])
        ax.axis("off")
        ax.text(0.5, 0.5, "no pair-gallery image to show", ha="center", va="center", color="0.35")
    half = n_tiles
    _correlations(fig.add_subplot(grid[1, :half]), fig_data.correlations)
    _road(fig.add_subplot(grid[1, half:]), fig_data.road)
    fig.suptitle(f"{title}\n{fig_data.example_title}" if fig_data.example_title else title, fontsize=11)
    return fig


def _correlations(ax, rows: Sequence[tuple[str, np.ndarray, float]]) -> None:
    if not rows:
        ax.axis("off")
        ax.text(0.5, 0.5, "no rank correlations measured", ha="center", va="center", color="0.35")
        return
    rng = np.random.default_rng(0)   # horizontal jitter only, so the figure is the same every run
    for y, (label, values, threshold) in enumerate(rows):
        v = np.asarray(values, np.float64)
        v = v[np.isfinite(v)]
        ax.scatter(v, y + rng.uniform(-0.18, 0.18, len(v)), s=12, alpha=0.6, color=METHOD_COLOUR)
        if len(v):
            ax.plot([np.median(v)] * 2, [y - 0.3, y + 0.3], color="black", linewidth=2)
        ax.plot([threshold] * 2, [y - 0.4, y + 0.4], color="#d62728", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_xlim(-1.05, 1.05)
    ax.invert_yaxis()
    ax.set_xlabel("Spearman rank correlation per image (black: median; red dashed: flag above)", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.set_title("Class sensitivity and randomisation", fontsize=9)


def _road(ax, rows: Sequence[tuple[str, float, float, float]]) -> None:
    if not rows:
        ax.axis("off")
        ax.text(0.5, 0.5, "no ROAD scores measured", ha="center", va="center", color="0.35")
        return
    x = np.arange(len(rows))
    width = 0.27
    for k, (label, colour) in enumerate((("CAM", METHOD_COLOUR), ("random maps", RANDOM_COLOUR),
                                         ("Sobel edges", SOBEL_COLOUR))):
        ax.bar(x + (k - 1) * width, [r[1 + k] for r in rows], width, color=colour, label=label)
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_xticks(x, [r[0] for r in rows], fontsize=8)
    ax.set_ylabel("ROAD score (lower = more faithful)", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc="best")   # few artists: "best" is cheap here
    ax.set_title("ROAD most-relevant-first: each method against both baselines", fontsize=9)
