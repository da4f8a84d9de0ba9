"""Matplotlib figures. Every function here only DRAWS already-computed values and returns a matplotlib Figure;
nothing here runs a model or writes a file (the caller saves it, e.g. with helpers.files.png.save_figure).
The PIL pages (galleries, label suspects) are in plots/gallery.py, the Plotly/HTML pages in plots/interactive.py.

Figures are built with `matplotlib.figure.Figure` directly, not through pyplot, which would keep every figure
alive until closed. In a notebook the returned Figure displays as the cell's value (or with `display(fig)`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import colors as mcolors
from matplotlib.figure import Figure

from helpers.errors import ConfigError
from helpers.plots.common import (class_colours, colormap, embedding_inputs, name_lookup,
                                  require_columns)
from helpers.plots.fonts import with_fallback_fonts
from helpers.plots.overlay import to_rgb_uint8

__all__ = [
    "plot_confusion_matrix", "plot_confusion_overview", "plot_confusion_subset", "plot_group_confusion", "plot_coarse_confusion", "plot_top_pairs", "plot_head_cosine",
    "plot_embedding", "plot_occlusion", "plot_reliability_diagram", "plot_accuracy_deltas", "plot_pair_changes",
]

# ----------------------------------------------------------------------------------------------
# Small shared helpers
# ----------------------------------------------------------------------------------------------

def _text_figure(message: str, title: str, figsize=(6, 2.5)) -> Figure:
    """A figure that says there is nothing to draw, so callers never crash on empty inputs."""
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11, color="0.35")
    return fig


def _annotated_heatmap(ax, values: np.ndarray, labels: np.ndarray, cmap, norm, fontsize: float) -> None:
    """Write `labels[i, j]` in each cell, white on dark cells and black on light ones."""
    rgba = cmap(norm(values))
    luminance = 0.299 * rgba[..., 0] + 0.587 * rgba[..., 1] + 0.114 * rgba[..., 2]
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            # inside its cell, so constrained layout need not measure it (a matrix has hundreds of them)
            ax.text(j, i, labels[i, j], ha="center", va="center", fontsize=fontsize,
                    color="white" if luminance[i, j] < 0.5 else "black").set_in_layout(False)


# ----------------------------------------------------------------------------------------------
# Confusion matrices
# ----------------------------------------------------------------------------------------------

@with_fallback_fonts
def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], normalize: bool = False,
                          title: Optional[str] = None, order: Optional[Sequence[int]] = None,
                          group_boundaries: Optional[Sequence[int]] = None) -> Figure:
    """Confusion matrix, rows = true class, columns = predicted class.

    normalize: colour (and annotate) the row-normalised % instead of counts.
    order: a permutation of class ids (e.g. grouped by superclass) applied to rows and columns.
    group_boundaries: positions in the ORDERED matrix where a new block starts; a thin line is
    drawn before each. More than 20 classes: a 28×26 in figure, every class named (fontsize 7), and a
    PowerNorm(0.5) colour scale so that the small off-diagonal values stay visible. Up to 20 classes:
    a small figure with the count written in every cell."""
    cm = np.asarray(cm)
    names = list(class_names)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(names):
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(names)} class names")
    C = cm.shape[0]
    if order is not None:
        order = np.asarray(order, dtype=np.int64)
        if sorted(order.tolist()) != list(range(C)):
            raise ValueError("order must be a permutation of range(num_classes)")
        cm = cm[np.ix_(order, order)]
        names = [names[i] for i in order]
    total = int(cm.sum())
    correct = int(np.trace(cm))
    acc_text = f"accuracy {correct / total:.1%} ({correct}/{total})" if total else "no images"
    row_pct = 100.0 * cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    values = row_pct if normalize else cm.astype(np.float64)
    vmax = max(float(values.max(initial=0)), 1e-9)
    large = C > 20

    cmap = colormap("Blues")
    if large:
        norm = mcolors.PowerNorm(gamma=0.5, vmin=0, vmax=vmax)
        tick_fs = 7
        fig, ax, cax = _fixed_matrix_axes(names, tick_fs)
    else:
        norm = mcolors.Normalize(vmin=0, vmax=vmax)
        side = max(5.0, 0.55 * C + 2.5)
        fig = Figure(figsize=(side + 1.5, side), layout="constrained")
        tick_fs = 9
        ax, cax = fig.add_subplot(), None
    im = ax.imshow(values, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
    ax.set_xticks(np.arange(C), labels=names, rotation=90, fontsize=tick_fs)
    ax.set_yticks(np.arange(C), labels=names, fontsize=tick_fs)
    ax.set_xlabel("Predicted class", fontsize=12 if large else 10)
    ax.set_ylabel("True class", fontsize=12 if large else 10)
    scale_note = " (colour: square-root scale)" if large else ""
    ax.set_title(f"{title or 'Confusion matrix'} — {acc_text}{scale_note}", fontsize=18 if large else 12)
    cbar = fig.colorbar(im, cax=cax) if large else fig.colorbar(im, ax=ax, fraction=0.05, pad=0.01)
    cbar.set_label("% of the true class (row-normalised)" if normalize else "images")
    if not large:
        if normalize:
            labels = np.array([[f"{cm[i, j]}\n{row_pct[i, j]:.0f}%" for j in range(C)] for i in range(C)])
        else:
            labels = cm.astype(np.int64).astype(str)
        _annotated_heatmap(ax, values, labels, cmap, norm, fontsize=8 if C <= 12 else 6.5)
    for b in group_boundaries or ():
        if 0 < b < C:
            ax.axhline(b - 0.5, color="0.25", lw=0.7)
            ax.axvline(b - 0.5, color="0.25", lw=0.7)
    return fig


@with_fallback_fonts
def plot_confusion_overview(cm: np.ndarray, order: Sequence[int], spans: Sequence[tuple[int, int, int]],
                            group_kind: str = "cluster", title: str = "Confusion matrix",
                            note: Optional[str] = None, max_labels: int = 60) -> Figure:
    """The whole matrix of too many classes to name each (hundreds): rows and columns in `order`, a class a
    pixel row, PowerNorm(0.5) colours so single errors show; the groups (superclasses or clusters) as runs
    `spans` = (start, stop exclusive, group number) along `order`, outlined on the diagonal and numbered on
    both axes by group number + 1 (at most `max_labels` numbers, for the largest groups at least 1% of the side).
    The groups' names belong in a second figure (plot_coarse_confusion)."""
    cm = np.asarray(cm)
    n = len(cm)
    order = np.asarray(order, dtype=np.int64)
    if cm.shape != (n, n) or sorted(order.tolist()) != list(range(n)):
        raise ValueError(f"cm {cm.shape} must be square and order a permutation of range({n})")
    m = cm[np.ix_(order, order)].astype(np.float64)
    total, correct = int(cm.sum()), int(np.trace(cm))
    acc = f"accuracy {correct / total:.1%} ({correct}/{total})" if total else "no images"
    # the widest groups, left to right; one narrower than 1% of the side has no room for its number
    named = sorted(s for s in sorted(spans, key=lambda s: s[0] - s[1])[:max_labels] if s[1] - s[0] >= n / 100)
    labels = [str(g + 1) for _, _, g in named]
    fig, ax, cax = _fixed_matrix_axes(labels or ["0"], 9, size_in=(28.0, 26.0), x_rotation=0, title_h=1.0)
    norm = mcolors.PowerNorm(gamma=0.5, vmin=0, vmax=max(float(m.max(initial=0)), 1e-9))
    im = ax.imshow(m, cmap=colormap("Blues"), norm=norm, interpolation="nearest", aspect="equal")
    centres = [(a + b - 1) / 2 for a, b, _ in named]
    ax.set_xticks(centres, labels=labels, fontsize=9)
    ax.set_yticks(centres, labels=labels, fontsize=9)
    from matplotlib.patches import Rectangle
    for a, b, _ in spans:
        ax.add_patch(Rectangle((a - 0.5, a - 0.5), b - a, b - a, fill=False, lw=0.8, edgecolor="#d62728"))
    ax.set_xlabel(f"Predicted class, by {group_kind} (numbered)", fontsize=12)
    ax.set_ylabel(f"True class, by {group_kind} (numbered)", fontsize=12)
    ax.set_title(f"{title} — {n} classes, {acc}; {len(spans)} {group_kind}s outlined (colour: square-root scale)"
                 + (f"\n{note}" if note else ""), fontsize=16)
    fig.colorbar(im, cax=cax).set_label("images")
    return fig


@with_fallback_fonts
def plot_confusion_subset(cm: np.ndarray, class_names: Sequence[str], num_classes: int,
                          title: str = "Confusion matrix", note: Optional[str] = None) -> Figure:
    """The confusion among a selection of classes (e.g. ordering.most_confused_classes), sized for a notebook:
    about 9 in wide, every class named, the count in every non-zero cell, PowerNorm(0.5) colours as in the full
    matrix. `cm` is the selection's sub-matrix in display order; num_classes is the size of the full matrix;
    `note` is a line under the title (where the full matrix is)."""
    cm = np.asarray(cm)
    names = list(class_names)
    k = len(names)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix {cm.shape} does not match {k} class names")
    fs = 8 if k <= 30 else 6
    fig = Figure(figsize=(9.5, 9.0), layout="constrained")
    ax = fig.add_subplot()
    cmap = colormap("Blues")
    norm = mcolors.PowerNorm(gamma=0.5, vmin=0, vmax=max(float(cm.max(initial=0)), 1e-9))
    im = ax.imshow(cm.astype(np.float64), cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
    labels = np.where(cm > 0, cm.astype(np.int64).astype(str), "")
    _annotated_heatmap(ax, cm.astype(np.float64), labels, cmap, norm, fontsize=6 if k <= 30 else 4.5)
    ax.set_xticks(np.arange(k), labels=names, rotation=90, fontsize=fs)
    ax.set_yticks(np.arange(k), labels=names, fontsize=fs)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    head = f"{title} — the {k} most confused of {num_classes} classes" if k < num_classes else title
    ax.set_title(head + (f"\n{note}" if note else ""), fontsize=11)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).set_label("images (square-root scale)")
    return fig


def _label_extent_in(names: Sequence[str], fontsize: float) -> tuple[float, float]:
    """(widest, tallest) of `names` as tick labels of this font size, in inches (matplotlib's font metrics)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import text_to_path
    prop = FontProperties(size=fontsize)
    sizes = [text_to_path.get_text_width_height_descent(str(n), prop, ismath=False)[:2] for n in names] or [(0, 0)]
    return max(w for w, _ in sizes) / 72.0, max(h for _, h in sizes) / 72.0


def _fixed_matrix_axes(names: Sequence[str], tick_fs: float, size_in: tuple[float, float] = (28.0, 26.0),
                       x_rotation: float = 90.0, title_h: float = 0.6):
    """(figure, axes, colour-bar axes) of a fixed layout for a square matrix with every class named.

    Margins come from the longest class name, measured with matplotlib's own font metrics (x labels rotated by
    x_rotation degrees); the matrix is the largest square left. Constrained layout would find the same, but it
    measures the tick labels in an extra draw."""
    longest, line = _label_extent_in(names, tick_fs)
    angle = math.radians(x_rotation)
    fig_w, fig_h = size_in
    pad, axis_label, tick_gap = 0.25, 0.35, 0.12            # inches: outer pad, axis-label band, tick + its pad
    cbar_gap, cbar_w, cbar_text = 0.15, 0.35, 0.95
    left = pad + axis_label + longest + tick_gap
    bottom = pad + axis_label + longest * math.sin(angle) + line * abs(math.cos(angle)) + tick_gap
    side = max(1.0, min(fig_w - left - cbar_gap - cbar_w - cbar_text - pad, fig_h - bottom - title_h - pad))
    x0 = left + max(0.0, (fig_w - left - side - cbar_gap - cbar_w - cbar_text - pad) / 2)
    fig = Figure(figsize=size_in)
    ax = fig.add_axes((x0 / fig_w, bottom / fig_h, side / fig_w, side / fig_h))
    cax = fig.add_axes(((x0 + side + cbar_gap) / fig_w, bottom / fig_h, cbar_w / fig_w, side / fig_h))
    return fig, ax, cax


def _row_percent(row_pct: np.ndarray) -> np.ndarray:
    """Row percentages as 0–100; fractions (0–1) are scaled (a % matrix always has an entry ≥ 1
    in a non-empty row of ≤ 100 columns)."""
    p = np.asarray(row_pct, dtype=np.float64)
    return p * 100.0 if p.size and np.nanmax(p) <= 1.0 else p


@with_fallback_fonts
def plot_group_confusion(counts: np.ndarray, row_pct: np.ndarray, names: Sequence[str]) -> Figure:
    """k×k confusion heatmap between groups of classes; each cell shows "count\\n(xx.x%)" where %
    is the share of the row's (true group's) images. row_pct in percent (fractions accepted)."""
    counts = np.asarray(counts)
    pct = _row_percent(row_pct)
    k = len(names)
    if counts.shape != (k, k) or pct.shape != (k, k):
        raise ValueError(f"counts {counts.shape} / row_pct {pct.shape} do not match {k} names")
    side = max(4.5, 0.9 * k + 2.0)
    fig = Figure(figsize=(side + 1.3, side), layout="constrained")
    ax = fig.add_subplot()
    cmap, norm = colormap("Blues"), mcolors.Normalize(vmin=0, vmax=100)
    im = ax.imshow(pct, cmap=cmap, norm=norm, interpolation="nearest")
    labels = np.array([[f"{int(counts[i, j])}\n({pct[i, j]:.1f}%)" for j in range(k)] for i in range(k)])
    _annotated_heatmap(ax, pct, labels, cmap, norm, fontsize=9 if k <= 8 else 7)
    ax.set_xticks(np.arange(k), labels=list(names), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(np.arange(k), labels=list(names))
    ax.set_xlabel("Predicted group")
    ax.set_ylabel("True group")
    total = counts.sum()
    acc = f" — group-level accuracy {np.trace(counts) / total:.1%}" if total else ""
    ax.set_title(f"Confusion between groups{acc}")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).set_label("% of the true group")
    return fig


@with_fallback_fonts
def plot_coarse_confusion(cm20: np.ndarray, coarse_names: Sequence[str], what: str = "superclass") -> Figure:
    """Superclass confusion matrix (e.g. CIFAR-100's 20×20), coloured and annotated with row %. `what` names the
    groups ("superclass", or "cluster" for clusters of the confusion)."""
    cm = np.asarray(cm20)
    k = len(coarse_names)
    if cm.shape != (k, k):
        raise ValueError(f"coarse confusion matrix {cm.shape} does not match {k} superclass names")
    pct = 100.0 * cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = max(5.0, 0.55 * k + 2.5)
    rotation = 60   # of the x tick labels
    if k > 12:   # fixed margins from the names' lengths: a layout engine walks the 400 cell labels in an extra draw
        fig, ax, cax = _fixed_matrix_axes(list(coarse_names), 8, size_in=(side + 1.5, side), x_rotation=rotation,
                                          title_h=0.45)
    else:        # small matrices: constrained layout, in a figure grown by the longest (rotated) name
        longest = _label_extent_in(list(coarse_names), 8)[0]
        fig = Figure(figsize=(side + 1.5 + longest, side + math.sin(math.radians(rotation)) * longest),
                     layout="constrained")
        ax, cax = fig.add_subplot(), None
    cmap, norm = colormap("Blues"), mcolors.PowerNorm(gamma=0.5, vmin=0, vmax=100)
    im = ax.imshow(pct, cmap=cmap, norm=norm, interpolation="nearest")
    labels = np.array([[("0" if cm[i, j] == 0 else f"{pct[i, j]:.1f}") for j in range(k)] for i in range(k)])
    _annotated_heatmap(ax, pct, labels, cmap, norm, fontsize=7 if k > 12 else 9)
    ax.set_xticks(np.arange(k), labels=list(coarse_names), rotation=rotation, ha="right", rotation_mode="anchor",
                  fontsize=8)
    ax.set_yticks(np.arange(k), labels=list(coarse_names), fontsize=8)
    ax.set_xlabel(f"Predicted {what}")
    ax.set_ylabel(f"True {what}")
    total = cm.sum()
    acc = f" — {what} accuracy {np.trace(cm) / total:.1%}" if total else ""
    ax.set_title(f"{what.capitalize()} confusion (row %){acc}")
    bar = fig.colorbar(im, cax=cax) if cax is not None else fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label(f"% of the true {what} (square-root scale)")
    return fig


# ----------------------------------------------------------------------------------------------
# Confused pairs, classifier head
# ----------------------------------------------------------------------------------------------

@with_fallback_fonts
def plot_top_pairs(pairs_df: pd.DataFrame) -> Figure:
    """Horizontal bars of the most confused (true → predicted) pairs, most confused on top.
    Columns (metrics.most_confused): true_name, pred_name, count; optional share_of_true (fraction of the true
    class's images, 0–1) written at the bar ends, and same_superclass (nullable boolean) which sets the bar
    colour: red for True, blue for False or <NA>; all <NA> (no superclasses known): one plain colour."""
    if pairs_df is None or len(pairs_df) == 0:
        return _text_figure("no misclassified pairs", "Most confused class pairs")
    require_columns(pairs_df, ("true_name", "pred_name", "count"), "the pairs table")
    df = pairs_df.sort_values("count", ascending=False, kind="stable").reset_index(drop=True)
    counts = df["count"].to_numpy()
    shares = df["share_of_true"].to_numpy(dtype=np.float64) * 100.0 if "share_of_true" in df.columns else None
    labels = [f"{a} → {b}" for a, b in zip(df["true_name"], df["pred_name"])]
    same = None
    if "same_superclass" in df.columns:
        try:   # not bool(): the CSV's "yes"/"no" would both read as True
            known = pd.array(df["same_superclass"], dtype="boolean")
        except TypeError:
            raise ConfigError("same_superclass must be True/False/<NA> (metrics.most_confused), got "
                              f"{sorted(set(map(str, df['same_superclass'])))[:5]}") from None
        if not known.isna().all():
            same = known.fillna(False).to_numpy(dtype=bool)

    colour_same, colour_diff, colour_plain = "#d62728", "#1f77b4", "#4c72b0"
    colours = [colour_plain] * len(df) if same is None else [colour_same if s else colour_diff for s in same]
    fig = Figure(figsize=(9, 0.32 * len(df) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(df))
    ax.barh(y, counts, color=colours)
    ax.set_yticks(y, labels=labels, fontsize=9)
    ax.invert_yaxis()  # most confused on top
    xmax = float(max(counts.max(), 1))
    for i, c in enumerate(counts):
        text = f"{c} ({shares[i]:.1f}%)" if shares is not None else f"{c}"
        ax.text(c + xmax * 0.01, i, text, va="center", fontsize=8)
    ax.set_xlim(0, xmax * 1.18)  # room for the text at the bar ends
    ax.set_xlabel("misclassified test images (share of the true class)")
    ax.set_title(f"Top {len(df)} confused pairs: true → predicted")
    if same is not None:
        from matplotlib.patches import Patch
        ax.legend(handles=[Patch(color=colour_same, label="same superclass: yes"),
                           Patch(color=colour_diff, label="same superclass: no")],
                  loc="lower right", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return fig


@with_fallback_fonts
def plot_head_cosine(sim: np.ndarray, names: Sequence[str]) -> Figure:
    """Cosine similarity between the classifier-head weight vectors of a few classes (annotated,
    diverging colours over [-1, 1])."""
    sim = np.asarray(sim, dtype=np.float64)
    k = len(names)
    if sim.shape != (k, k):
        raise ValueError(f"similarity matrix {sim.shape} does not match {k} names")
    side = max(4.0, 0.75 * k + 2.0)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    cmap, norm = colormap("RdBu_r"), mcolors.Normalize(vmin=-1, vmax=1)
    im = ax.imshow(sim, cmap=cmap, norm=norm, interpolation="nearest")
    labels = np.array([[f"{sim[i, j]:.2f}" for j in range(k)] for i in range(k)])
    rgba = cmap(norm(sim))
    for i in range(k):  # dark text except on the saturated ends of RdBu
        for j in range(k):
            lum = 0.299 * rgba[i, j, 0] + 0.587 * rgba[i, j, 1] + 0.114 * rgba[i, j, 2]
            ax.text(j, i, labels[i, j], ha="center", va="center", fontsize=9 if k <= 10 else 7,
                    color="white" if lum < 0.45 else "black")
    ax.set_xticks(np.arange(k), labels=list(names), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(np.arange(k), labels=list(names))
    ax.set_title("Cosine similarity of classifier-head weights")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).set_label("cosine similarity")
    return fig


# ----------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------


@with_fallback_fonts
def plot_embedding(coords: np.ndarray, labels: np.ndarray, preds: np.ndarray, class_ids: Sequence[int],
                   names: Sequence[str], method: str) -> Figure:
    """2-D embedding (UMAP / t-SNE) of the features: one colour per true class, misclassified
    images drawn as '×' in their true class's colour."""
    coords, labels, preds, ids = embedding_inputs(coords, labels, preds, class_ids)
    name = name_lookup(names, class_ids)
    if len(coords) == 0:
        return _text_figure("no points", f"{method} embedding")
    fig = Figure(figsize=(10, 7.5), layout="constrained")
    ax = fig.add_subplot()
    colours = class_colours(len(ids))
    wrong_all = preds != labels
    for colour, c in zip(colours, ids):
        m = labels == c
        ok, wrong = m & ~wrong_all, m & wrong_all
        ax.scatter(coords[ok, 0], coords[ok, 1], s=14, color=colour, alpha=0.75, linewidths=0,
                   label=f"{name(c)} ({int(m.sum())})")
        ax.scatter(coords[wrong, 0], coords[wrong, 1], s=34, color=colour, marker="x", linewidths=1.3)
    ax.scatter([], [], s=34, color="0.3", marker="x", label="× = misclassified")
    n_wrong = int(wrong_all.sum())
    ax.set_title(f"{method} of penultimate-layer features — {len(coords)} images, "
                 f"{n_wrong} misclassified (×)")
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    if len(ids) <= 30:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="true class",
                  markerscale=1.5)
    return fig


# ----------------------------------------------------------------------------------------------
# Deep dive: occlusion, calibration
# ----------------------------------------------------------------------------------------------

@with_fallback_fonts
def plot_occlusion(images: Sequence[np.ndarray], cam_overlays: Sequence[np.ndarray],
                   occlusion_maps: Sequence[np.ndarray], titles: Sequence[str]) -> Figure:
    """One row per image: original | Grad-CAM overlay | occlusion sensitivity (drop in the class
    score when that patch is hidden; heat map with its colour bar). Comparing the last two columns
    shows whether the CAM points at regions the model really depends on."""
    n = len(images)
    if not (len(cam_overlays) == len(occlusion_maps) == len(titles) == n):
        raise ValueError("images, cam_overlays, occlusion_maps and titles must have the same length")
    if n == 0:
        return _text_figure("no images", "Occlusion sensitivity")
    fig = Figure(figsize=(10.5, 3.1 * n + 0.6), layout="constrained")
    axes = fig.subplots(n, 3, squeeze=False)
    for r in range(n):
        occ = np.asarray(occlusion_maps[r], dtype=np.float64)
        axes[r, 0].imshow(to_rgb_uint8(images[r]), interpolation="nearest")
        axes[r, 0].set_title(titles[r], fontsize=9, loc="left")
        axes[r, 1].imshow(to_rgb_uint8(cam_overlays[r]), interpolation="bilinear")
        lo, hi = float(np.nanmin(occ)), float(np.nanmax(occ))
        if lo < 0:  # both signs: centre the diverging map at 0 (blue = hiding it RAISES the score)
            m = max(abs(lo), abs(hi), 1e-9)
            im = axes[r, 2].imshow(occ, cmap=colormap("RdBu_r"), vmin=-m, vmax=m, interpolation="nearest")
        else:
            im = axes[r, 2].imshow(occ, cmap=colormap("inferno"), vmin=0, vmax=max(hi, 1e-9),
                                   interpolation="nearest")
        fig.colorbar(im, ax=axes[r, 2], fraction=0.046, pad=0.03).set_label("score drop when hidden",
                                                                            fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title(f"input\n{titles[0]}", fontsize=9, loc="left")
    axes[0, 1].set_title("Grad-CAM overlay (red = high)", fontsize=9)
    axes[0, 2].set_title("occlusion sensitivity", fontsize=9)
    fig.suptitle("Grad-CAM vs occlusion: does the model really use the highlighted region?", fontsize=11)
    return fig


def plot_reliability_diagram(bins_df: pd.DataFrame, ece: float) -> Figure:
    """Reliability diagram: accuracy per confidence bin (bars) against the diagonal of perfect
    calibration, the gap to each bin's mean confidence shaded, and the number of images per bin
    below. Columns: bin_lower, bin_upper, count, accuracy, confidence."""
    require_columns(bins_df, ("bin_lower", "bin_upper", "count", "accuracy", "confidence"), "the calibration bins")
    lower = bins_df["bin_lower"].to_numpy(dtype=np.float64)
    upper = bins_df["bin_upper"].to_numpy(dtype=np.float64)
    count = bins_df["count"].to_numpy(dtype=np.float64)
    acc = bins_df["accuracy"].to_numpy(dtype=np.float64)
    conf = bins_df["confidence"].to_numpy(dtype=np.float64)
    filled = count > 0
    width = upper - lower
    centre = (lower + upper) / 2

    fig = Figure(figsize=(6.5, 7.5), layout="constrained")
    ax, ax_n = fig.subplots(2, 1, sharex=True, gridspec_kw=dict(height_ratios=[3, 1]))
    ax.bar(centre[filled], acc[filled], width=width[filled], color="#4c72b0", edgecolor="white",
           label="accuracy")
    gap_bottom = np.minimum(acc, conf)[filled]
    ax.bar(centre[filled], np.abs(conf - acc)[filled], bottom=gap_bottom, width=width[filled],
           color="#d62728", alpha=0.3, hatch="//", edgecolor="#d62728", label="gap to confidence")
    ax.plot([0, 1], [0, 1], ls="--", color="black", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram — ECE = {100 * ece:.2f}%")
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(alpha=0.3)
    ax_n.bar(centre, count, width=width, color="0.5", edgecolor="white")
    ax_n.set_xlabel("confidence (max softmax probability)")
    ax_n.set_ylabel("images")
    if count.max(initial=0) > 0 and count[filled].min() * 50 < count.max():
        ax_n.set_yscale("log")  # the top bin usually dwarfs the others
    ax_n.grid(alpha=0.3)
    return fig


# ----------------------------------------------------------------------------------------------
# Comparing two checkpoints (helpers.compare computes the tables)
# ----------------------------------------------------------------------------------------------

@with_fallback_fonts
def plot_accuracy_deltas(per_class_df: pd.DataFrame, name_a: str = "A", name_b: str = "B") -> Figure:
    """Bars of accuracy_b − accuracy_a for every class with test images, sorted (most improved on the
    left); green = better under B, red = worse. Columns: class_name, delta, support."""
    df = per_class_df[per_class_df["support"] > 0]
    if len(df) == 0:
        return _text_figure("no classes with test images", "Per-class accuracy change")
    df = df.sort_values(["delta", "class_name"], ascending=[False, True], kind="stable").reset_index(drop=True)
    C = len(df)
    delta = df["delta"].to_numpy(dtype=np.float64)
    fig = Figure(figsize=(max(8.0, 0.2 * C + 2.5), 5.0), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(C)
    ax.bar(x, delta, color=np.where(delta > 0, "#2ca02c", np.where(delta < 0, "#d62728", "#999999")), width=0.85)
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(float(delta.mean()), color="black", ls="--", lw=1, label=f"mean change {delta.mean() * 100:+.2f} pp")
    ax.set_xticks(x, labels=df["class_name"].astype(str).tolist(), rotation=90, fontsize=6 if C > 40 else 8)
    ax.set_xlim(-0.6, C - 0.4)
    lim = max(float(np.abs(delta).max()), 0.01) * 1.1
    ax.set_ylim(-lim, lim)
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_ylabel("accuracy B − A")
    ax.set_title(f"Per-class accuracy change: {int((delta > 0).sum())} classes better, {int((delta < 0).sum())} worse"
                 f"\nA = {name_a} · B = {name_b}", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


@with_fallback_fonts
def plot_pair_changes(pairs_df: pd.DataFrame, k: int = 10) -> Figure:
    """Horizontal bars of the k confused pairs that improved most (fewer errors under B, green) and the k
    that worsened most (red), labelled "true → pred (count A → count B)". Columns: true_name, pred_name,
    count_a, count_b, delta (= count_b − count_a)."""
    if pairs_df is None or len(pairs_df) == 0:
        return _text_figure("no confused pair changed between the two models", "Confused pairs: better and worse")
    better = pairs_df[pairs_df["delta"] < 0].sort_values("delta", kind="stable").head(k)
    worse = pairs_df[pairs_df["delta"] > 0].sort_values("delta", ascending=False, kind="stable").head(k)
    df = pd.concat([better, worse.iloc[::-1]]).reset_index(drop=True)
    delta = df["delta"].to_numpy(dtype=np.float64)
    fig = Figure(figsize=(9, 0.3 * len(df) + 1.6), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(df))
    ax.barh(y, delta, color=np.where(delta < 0, "#2ca02c", "#d62728"))
    ax.set_yticks(y, labels=[f"{r.true_name} → {r.pred_name} ({r.count_a} → {r.count_b})" for r in df.itertuples()],
                  fontsize=8)
    ax.invert_yaxis()   # most improved on top, most worsened at the bottom
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("errors B − A (negative = fewer under B)")
    ax.set_title(f"Confused pairs: {len(better)} most improved (green), {len(worse)} most worsened (red)", fontsize=10)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(axis="x", alpha=0.3)
    return fig
