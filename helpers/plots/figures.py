"""Figures. Every function here only DRAWS already-computed values and returns a matplotlib Figure,
a PIL.Image (RGB) or an HTML string; nothing here runs a model or writes a file (the caller saves
through helpers/atomic.py).

Matplotlib figures are built with `matplotlib.figure.Figure` directly, not through pyplot: the
pipeline draws hundreds of figures, and pyplot would keep every one alive until closed. In a notebook
the returned Figure displays as the cell's value (or with `display(fig)`).

The per-class and pair Grad-CAM galleries are drawn with PIL + numpy instead of matplotlib because
there are ~100 of them per run and matplotlib takes ~1 s each; PIL takes a few milliseconds.
"""
from __future__ import annotations

import base64
import functools
import html
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import cv2
import matplotlib
import numpy as np
import pandas as pd
from matplotlib import colors as mcolors
from matplotlib import font_manager
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont


from helpers.files import png
from helpers.errors import ConfigError, NumericalError

__all__ = [
    "GalleryRow", "GalleryLayout", "LAYOUT", "render_gallery", "difference_panel",
    "plot_confusion_matrix", "plot_top_pairs", "per_class_accuracy_html", "plot_per_class_accuracy",
    "plot_group_confusion", "plot_head_cosine", "plot_embedding", "embedding_html",
    "thumbnail_data_uri", "plot_occlusion", "plot_reliability_diagram", "plot_coarse_confusion",
    "render_label_suspects", "per_class_accuracy_figure", "confusion_heatmap_figure", "confusion_heatmap_html",
    "plotly_div", "PLOTLY_CONFIG", "CONFUSION_VIEWS",
]

# ----------------------------------------------------------------------------------------------
# Small shared helpers
# ----------------------------------------------------------------------------------------------

def _cmap(name: str):
    # matplotlib.cm.get_cmap was removed in matplotlib 3.9; the registry is the supported way.
    return matplotlib.colormaps[name]


def _as_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """Any (H,W), (H,W,1), (H,W,3) or (H,W,4) image as contiguous uint8 (H,W,3)."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        a = np.stack([a, a, a], axis=-1)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected an image of shape (H,W), (H,W,1), (H,W,3) or (H,W,4), got {a.shape}")
    a = a[:, :, :3]
    if a.dtype != np.uint8:
        # float images are taken as [0, 1] (the convention of show_cam_on_image's input)
        scale = 255.0 if np.issubdtype(a.dtype, np.floating) and a.max(initial=0) <= 1.0 else 1.0
        a = np.clip(np.nan_to_num(a.astype(np.float64) * scale), 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(a)


def _col(df: pd.DataFrame, *candidates: str, required: bool = True) -> Optional[str]:
    """The first of `candidates` that is a column of df (the analysis tables may name them slightly
    differently); raises ConfigError naming the accepted names when a required one is missing."""
    for c in candidates:
        if c in df.columns:
            return c
    if required:
        raise ConfigError(
            f"table is missing a column: expected one of {list(candidates)}, has {list(df.columns)}")
    return None


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
            # inside its cell, so constrained layout need not measure it (400 texts cost ~1 s a draw)
            ax.text(j, i, labels[i, j], ha="center", va="center", fontsize=fontsize,
                    color="white" if luminance[i, j] < 0.5 else "black").set_in_layout(False)


def _class_colours(n: int) -> list:
    if n <= 10:
        return [_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        return [_cmap("tab20")(i) for i in range(n)]
    return [_cmap("turbo")(x) for x in np.linspace(0.05, 0.95, n)]


# ----------------------------------------------------------------------------------------------
# Grad-CAM galleries (PIL, fast)
# ----------------------------------------------------------------------------------------------

@dataclass
class GalleryRow:
    """One gallery row: the original image followed by its CAM panels."""
    image: np.ndarray                                   # (H, W, C) uint8, the original test image
    title: str                                          # e.g. "true: leopard · pred: tiger (0.87)"
    panels: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (label, RGB uint8 overlay)
    ok: Optional[bool] = None                           # True: green title, False: red, None: black


@dataclass(frozen=True)
class GalleryLayout:
    """Pixel sizes of the gallery layout (tests recompute the canvas size from these)."""
    pad: int = 12            # outer margin on every side
    gap: int = 6             # horizontal space between tiles
    title_h: int = 30        # big title line
    subtitle_h: int = 20     # optional subtitle line
    section_h: int = 28      # section heading ("5 worst predictions")
    row_title_h: int = 20    # per-row title ("true: … · pred: … (0.87)")
    label_h: int = 16        # per-tile label ("input", "CAM → pred: tiger")
    row_gap: int = 10        # space after each row
    cbar_h: int = 54         # one colour bar block: caption, strip, tick labels
    cbar_strip_h: int = 12
    cbar_max_w: int = 380
    min_width: int = 460     # so the title and colour bar stay readable with a single panel


LAYOUT = GalleryLayout()

_RED = (200, 0, 0)
_GREEN = (0, 130, 0)
_BLACK = (0, 0, 0)
_GREY = (90, 90, 90)
_FRAME = (200, 200, 200)


@functools.lru_cache(maxsize=None)
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    # DejaVu Sans ships with matplotlib, so this works offline and has →, ·, − glyphs.
    props = font_manager.FontProperties(family="DejaVu Sans", weight="bold" if bold else "normal")
    return ImageFont.truetype(font_manager.findfont(props), size)


@functools.lru_cache(maxsize=64)
def _colour_strip(cmap_name: str, width: int, height: int) -> np.ndarray:
    row = (_cmap(cmap_name)(np.linspace(0.0, 1.0, width))[:, :3] * 255).round().astype(np.uint8)
    strip = np.repeat(row[None, :, :], height, axis=0)
    strip.setflags(write=False)
    return strip


@functools.lru_cache(maxsize=8192)   # gallery pages repeat the same labels and headings
def _fit_text(text: str, font: ImageFont.FreeTypeFont, max_w: int) -> str:
    """`text`, cut with an ellipsis so that it fits in max_w pixels."""
    if font.getlength(text) <= max_w:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        if font.getlength(text[:mid] + "…") <= max_w:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "…"


@functools.lru_cache(maxsize=4096)
def _fit_label(label: str, max_w: int) -> tuple[str, ImageFont.FreeTypeFont]:
    """(text, font) of a tile label within max_w px: 11 px, else 10 px, else without the "CAM → " prefix
    (the row title names the classes too), else cut with an ellipsis. Class names stay whole when possible."""
    for text in (label, label.replace("CAM → ", "", 1)):
        for size in (11, 10):
            if _font(size).getlength(text) <= max_w:
                return text, _font(size)
    return _fit_text(label.replace("CAM → ", "", 1), _font(10), max_w), _font(10)


def _display_size(h: int, w: int, tile: int) -> tuple[int, int]:
    """Size an (h, w) image is shown at inside a tile: an integer upscale (crisp pixels) when it is
    small, a plain fit when it is larger than the tile."""
    if max(h, w) <= tile:
        k = tile // max(h, w)
        return h * k, w * k
    s = tile / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def _resize(img: np.ndarray, size_hw: tuple[int, int], smooth: bool) -> np.ndarray:
    h, w = img.shape[:2]
    th, tw = size_hw
    if (h, w) == (th, tw):
        return img
    if not smooth and th % h == 0 and tw % w == 0:
        return np.repeat(np.repeat(img, th // h, axis=0), tw // w, axis=1)  # fastest nearest upscale
    if smooth and th >= h and tw >= w:
        # Bilinear upscale of a heat map: OpenCV's matches Pillow's to ±1 grey level in ~1/7 of the time
        # (13 per gallery page).
        return cv2.resize(np.ascontiguousarray(img), (tw, th), interpolation=cv2.INTER_LINEAR)
    # bilinear for shrinking large photos (Pillow's is antialiased); nearest keeps small images' pixels crisp
    resample = Image.BILINEAR if smooth or th < h else Image.NEAREST
    return np.asarray(Image.fromarray(img).resize((tw, th), resample))


def _place_tile(canvas: np.ndarray, shown: np.ndarray, x: int, y: int, tile: int) -> None:
    """Paste `shown` (already sized to fit) centred in the tile x..x+tile, y..y+tile, with a 1-px frame just
    outside the tile (the gaps leave room for it)."""
    h, w = shown.shape[:2]
    oy, ox = y + (tile - h) // 2, x + (tile - w) // 2
    canvas[oy:oy + h, ox:ox + w] = shown
    canvas[y - 1, x - 1:x + tile + 1] = _FRAME
    canvas[y + tile, x - 1:x + tile + 1] = _FRAME
    canvas[y:y + tile, x - 1] = _FRAME
    canvas[y:y + tile, x + tile] = _FRAME


def difference_panel(cam_true: np.ndarray, cam_pred: np.ndarray) -> np.ndarray:
    """RGB uint8 (H,W,3) picture of cam_true − cam_pred with the diverging 'RdBu_r' colormap over
    [-1, 1]: red = the region drives the TRUE class more, blue = it drives the PREDICTED class more,
    white = both the same. CAMs are (H,W) maps in [0, 1] (values outside are clipped)."""
    a = np.asarray(cam_true, dtype=np.float64)
    b = np.asarray(cam_pred, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"difference_panel needs two (H,W) CAMs of the same shape, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise NumericalError("a CAM contains NaN/inf values; the difference panel would be misleading")
    diff = np.clip(a, 0, 1) - np.clip(b, 0, 1)
    rgba = _cmap("RdBu_r")((diff + 1.0) / 2.0)
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def _draw_colour_bar(canvas: np.ndarray, texts: list, y0: int, width: int, cmap_name: str,
                     caption: str, ticks: Sequence[str]) -> None:
    """A horizontal colour strip centred in the canvas with a caption above and 3 tick labels below.
    Pixels go into `canvas`; text items go into `texts` (drawn later in one pass)."""
    L = LAYOUT
    strip_w = min(L.cbar_max_w, width - 2 * L.pad)
    x0 = (width - strip_w) // 2
    strip_y = y0 + 18
    canvas[strip_y:strip_y + L.cbar_strip_h, x0:x0 + strip_w] = _colour_strip(cmap_name, strip_w, L.cbar_strip_h)
    canvas[strip_y - 1, x0 - 1:x0 + strip_w + 1] = _GREY  # thin frame so the white middle of RdBu shows
    canvas[strip_y + L.cbar_strip_h, x0 - 1:x0 + strip_w + 1] = _GREY
    canvas[strip_y - 1:strip_y + L.cbar_strip_h + 1, x0 - 1] = _GREY
    canvas[strip_y - 1:strip_y + L.cbar_strip_h + 1, x0 + strip_w] = _GREY
    cap_font = _font(12)
    texts.append(((width // 2, y0 + 1), _fit_text(caption, cap_font, width - 2 * L.pad), cap_font, _BLACK, "mt"))
    tick_font = _font(11)
    tick_y = strip_y + L.cbar_strip_h + 3
    texts.append(((x0, tick_y), ticks[0], tick_font, _BLACK, "lt"))
    texts.append(((x0 + strip_w // 2, tick_y), ticks[1], tick_font, _BLACK, "mt"))
    texts.append(((x0 + strip_w, tick_y), ticks[2], tick_font, _BLACK, "rt"))


def render_gallery(title: str, sections: Sequence[tuple[str, Sequence[GalleryRow]]], tile: int = 128,
                   subtitle: Optional[str] = None) -> Image.Image:
    """A gallery picture (RGB PIL.Image): big title, optional subtitle, then for each section a
    heading and its rows; each row is a coloured title line, the original image and its panels
    (tiles of `tile` px; rows with fewer panels leave blanks). At the bottom, the JET colour bar of
    the CAM overlays, plus a RdBu_r bar when any panel label starts with "difference".

    Size: width = max(LAYOUT.min_width, 2*pad + ncols*tile + (ncols-1)*gap), ncols = 1 + most panels;
    height = 2*pad + title_h [+ subtitle_h] + Σ_sections (section_h + rows*(row_title_h + label_h +
    tile + row_gap)) + cbar_h * (1 or 2)."""
    L = LAYOUT
    if tile < 16:
        raise ConfigError(f"gallery tile must be at least 16 px, got {tile}")
    sections = [(str(h), list(rows)) for h, rows in sections]
    all_rows = [r for _, rows in sections for r in rows]
    ncols = 1 + max((len(r.panels) for r in all_rows), default=0)
    has_diff = any(lbl.lower().startswith("difference") for r in all_rows for lbl, _ in r.panels)
    row_h = L.row_title_h + L.label_h + tile + L.row_gap

    width = max(L.min_width, 2 * L.pad + ncols * tile + (ncols - 1) * L.gap)
    height = (2 * L.pad + L.title_h + (L.subtitle_h if subtitle else 0)
              + sum(L.section_h + len(rows) * row_h for _, rows in sections)
              + L.cbar_h * (2 if has_diff else 1))
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    # text is collected first and drawn in one ImageDraw pass after the pixels are in place
    texts: list = []  # ((x, y), text, font, colour, anchor)
    text_w = width - 2 * L.pad

    y = L.pad
    title_font = _font(20, bold=True)
    if title_font.getlength(title) > text_w:
        title_font = _font(16, bold=True)
    texts.append(((L.pad, y + 2), _fit_text(title, title_font, text_w), title_font, _BLACK, "lt"))
    y += L.title_h
    if subtitle:
        sub_font = _font(13)
        texts.append(((L.pad, y + 1), _fit_text(subtitle, sub_font, text_w), sub_font, _GREY, "lt"))
        y += L.subtitle_h

    section_font, row_font = _font(16, bold=True), _font(13, bold=True)
    for heading, rows in sections:
        shown = heading if rows else f"{heading} — none"
        texts.append(((L.pad, y + 4), _fit_text(shown, section_font, text_w), section_font, (40, 40, 40), "lt"))
        canvas[y + L.section_h - 3, L.pad:width - L.pad] = _FRAME  # rule under the heading
        y += L.section_h
        for row in rows:
            colour = _BLACK if row.ok is None else (_GREEN if row.ok else _RED)
            texts.append(((L.pad, y + 2), _fit_text(row.title, row_font, text_w), row_font, colour, "lt"))
            tiles_y = y + L.row_title_h + L.label_h
            original = _as_rgb_uint8(row.image)
            disp_h, disp_w = _display_size(*original.shape[:2], tile)
            # the original keeps crisp pixels; overlays are smooth heat maps, bilinear reads better
            items = [("input", original, False)] + [(lbl, _as_rgb_uint8(p), True) for lbl, p in row.panels]
            for c, (label, img, smooth) in enumerate(items):
                x = L.pad + c * (tile + L.gap)
                text, font = _fit_label(label, tile)
                texts.append(((x + tile // 2, y + L.row_title_h + 1), text, font, _BLACK, "mt"))
                _place_tile(canvas, _resize(img, (disp_h, disp_w), smooth), x, tiles_y, tile)
            y += row_h

    _draw_colour_bar(canvas, texts, y, width, "jet", "CAM: low → high importance", ("0", "0.5", "1"))
    y += L.cbar_h
    if has_diff:
        _draw_colour_bar(canvas, texts, y, width, "RdBu_r", "difference panel — true − pred: −1 … +1",
                         ("−1 (drives pred)", "0", "+1 (drives true)"))
        y += L.cbar_h

    out = Image.fromarray(canvas, mode="RGB")
    for (x, y), text, font, colour, anchor in texts:
        mask, dx, dy = _text_mask(text, font, anchor)
        out.paste(colour, (x + dx, y + dy), mask)
    return out


@functools.lru_cache(maxsize=4096)
def _text_mask(text: str, font: ImageFont.FreeTypeFont, anchor: str) -> tuple[Image.Image, int, int]:
    """(coverage mask, x offset, y offset from the anchor point) of `text`, rendered once: 100 gallery pages
    repeat the same tile labels, headings and colour-bar captions ~2,000 times. Pasting `colour` through the
    mask is what ImageDraw.text does (the same blend)."""
    left, top, right, bottom = font.getbbox(text, anchor=anchor)
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, font=font, fill=255, anchor=anchor)
    return mask, left, top


# ----------------------------------------------------------------------------------------------
# Confusion matrices
# ----------------------------------------------------------------------------------------------

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

    cmap = _cmap("Blues")
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
    measures the tick labels in an extra draw: the 100-class matrix saved in 1.3 s instead of 2.7 s."""
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
    cmap, norm = _cmap("Blues"), mcolors.Normalize(vmin=0, vmax=100)
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


def plot_coarse_confusion(cm20: np.ndarray, coarse_names: Sequence[str]) -> Figure:
    """Superclass confusion matrix (e.g. CIFAR-100's 20×20), coloured and annotated with row %."""
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
    cmap, norm = _cmap("Blues"), mcolors.PowerNorm(gamma=0.5, vmin=0, vmax=100)
    im = ax.imshow(pct, cmap=cmap, norm=norm, interpolation="nearest")
    labels = np.array([[("0" if cm[i, j] == 0 else f"{pct[i, j]:.1f}") for j in range(k)] for i in range(k)])
    _annotated_heatmap(ax, pct, labels, cmap, norm, fontsize=7 if k > 12 else 9)
    ax.set_xticks(np.arange(k), labels=list(coarse_names), rotation=rotation, ha="right", rotation_mode="anchor",
                  fontsize=8)
    ax.set_yticks(np.arange(k), labels=list(coarse_names), fontsize=8)
    ax.set_xlabel("Predicted superclass")
    ax.set_ylabel("True superclass")
    total = cm.sum()
    acc = f" — superclass accuracy {np.trace(cm) / total:.1%}" if total else ""
    ax.set_title(f"Superclass confusion (row %){acc}")
    bar = fig.colorbar(im, cax=cax) if cax is not None else fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label("% of the true superclass (square-root scale)")
    return fig


# ----------------------------------------------------------------------------------------------
# Confused pairs, per-class accuracy
# ----------------------------------------------------------------------------------------------

def plot_top_pairs(pairs_df: pd.DataFrame) -> Figure:
    """Horizontal bars of the most confused (true → predicted) pairs, most confused on top.
    Columns: true_name, pred_name, count, share (fraction of the true class's images, 0–1; or
    share_pct in %), optional same_superclass (bool) which sets the bar colour."""
    if pairs_df is None or len(pairs_df) == 0:
        return _text_figure("no misclassified pairs", "Most confused class pairs")
    t = _col(pairs_df, "true_name", "true", "true_class")
    p = _col(pairs_df, "pred_name", "predicted_name", "pred", "predicted", "pred_class")
    n = _col(pairs_df, "count", "n")
    share_col = _col(pairs_df, "share_of_true", "share", "fraction", "rate", required=False)
    pct_col = _col(pairs_df, "share_pct", "pct", "percent", required=False)
    same_col = _col(pairs_df, "same_superclass", required=False)

    df = pairs_df.sort_values(n, ascending=False, kind="stable").reset_index(drop=True)
    counts = df[n].to_numpy()
    if share_col is not None:
        shares = df[share_col].to_numpy(dtype=np.float64) * 100.0
    elif pct_col is not None:
        shares = df[pct_col].to_numpy(dtype=np.float64)
    else:
        shares = None
    labels = [f"{a} → {b}" for a, b in zip(df[t], df[p])]
    same = None
    if same_col is not None and df[same_col].notna().any():
        # metrics.most_confused writes "yes"/"no" ("" when the dataset has no superclasses)
        raw = df[same_col].fillna("")
        if raw.dtype == object and set(raw.astype(str)) <= {"yes", "no", ""}:
            same = None if (raw == "").all() else (raw == "yes").to_numpy()
        else:
            same = raw.astype(bool).to_numpy()

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


def _per_class_columns(table_df: pd.DataFrame) -> dict:
    return {
        "name": _col(table_df, "class", "class_name", "name"),
        "acc": _col(table_df, "accuracy", "acc"),
        "support": _col(table_df, "support", "n", "count", required=False),
        "correct": _col(table_df, "correct", "n_correct", required=False),
        "conf": _col(table_df, "mean_confidence", "mean_conf", "confidence", required=False),
        "wrong": _col(table_df, "top_wrong_prediction", "top_wrong", "top_wrong_name", "top_confusion", "most_confused_with",
                      required=False),
        "wrong_n": _col(table_df, "top_wrong_count", "top_confusion_count", required=False),
        "super": _col(table_df, "superclass", "coarse_name", "coarse", required=False),
    }


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and np.isnan(v)) and str(v) != ""


def per_class_accuracy_html(table_df: pd.DataFrame, plotlyjs="inline", fig=None) -> str:
    """per_class_accuracy_figure as a full HTML page that opens offline. plotlyjs: "inline" embeds
    plotly.js (self-contained, ~4.8 MB); a relative path such as "plotly.min.js" loads the copy
    shipped next to the page instead (see plotly_js_source). fig: that figure when already built."""
    return (fig if fig is not None else per_class_accuracy_figure(table_df)).to_html(
        include_plotlyjs=_include_plotlyjs(plotlyjs), full_html=True, config=PLOTLY_CONFIG)


def per_class_accuracy_figure(table_df: pd.DataFrame):
    """Interactive (Plotly) bar chart of per-class accuracy, worst class first, coloured by
    superclass when the table has one, dashed line at the mean (macro) accuracy; hover shows class,
    superclass, accuracy, correct/support, mean confidence, top wrong prediction and its count.
    Columns: class, accuracy (0–1); optional support, correct, mean_confidence, top_wrong,
    top_wrong_count, superclass."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative   # plotly.express would import only to hand over these palettes

    cols = _per_class_columns(table_df)
    df = table_df.sort_values([cols["acc"], cols["name"]], kind="stable").reset_index(drop=True)
    hover = []
    for _, r in df.iterrows():
        lines = [f"<b>{html.escape(str(r[cols['name']]))}</b>"]
        if cols["super"] and _present(r[cols["super"]]):
            lines.append(f"superclass: {html.escape(str(r[cols['super']]))}")
        lines.append(f"accuracy: {float(r[cols['acc']]):.1%}")
        if cols["correct"] and cols["support"]:
            lines.append(f"correct: {int(r[cols['correct']])}/{int(r[cols['support']])}")
        elif cols["support"]:
            lines.append(f"images: {int(r[cols['support']])}")
        if cols["conf"] and _present(r[cols["conf"]]):
            lines.append(f"mean confidence: {float(r[cols['conf']]):.2f}")
        if cols["wrong"] and _present(r[cols["wrong"]]):
            n_wrong = f" ({int(r[cols['wrong_n']])}×)" if cols["wrong_n"] and _present(r[cols["wrong_n"]]) else ""
            lines.append(f"most often predicted instead: {html.escape(str(r[cols['wrong']]))}{n_wrong}")
        hover.append("<br>".join(lines))
    df["_hover"] = hover

    fig = go.Figure()
    order = df[cols["name"]].astype(str).tolist()
    if cols["super"]:
        groups = sorted(set(df[cols["super"]].astype(str)))
        palette = qualitative.Dark24 + qualitative.Light24
        for gi, g in enumerate(groups):
            sub = df[df[cols["super"]].astype(str) == g]
            fig.add_trace(go.Bar(x=sub[cols["name"]].astype(str), y=sub[cols["acc"]], name=g,
                                 marker_color=palette[gi % len(palette)], hovertext=sub["_hover"],
                                 hovertemplate="%{hovertext}<extra></extra>"))
    else:
        fig.add_trace(go.Bar(x=order, y=df[cols["acc"]], name="accuracy", marker_color="#4c72b0",
                             hovertext=df["_hover"], hovertemplate="%{hovertext}<extra></extra>",
                             showlegend=False))
    mean_acc = float(df[cols["acc"]].mean()) if len(df) else float("nan")
    if len(df):
        fig.add_hline(y=mean_acc, line_dash="dash", line_color="black",
                      annotation_text=f"mean accuracy {mean_acc:.1%}", annotation_position="top left")
    fig.update_layout(
        title=f"Per-class accuracy ({len(df)} classes, worst first)",
        xaxis=dict(title="class", categoryorder="array", categoryarray=order, tickangle=-60,
                   tickfont=dict(size=9)),
        yaxis=dict(title="accuracy", range=[0, 1.05], tickformat=".0%"),
        legend=dict(title="superclass"), height=620, bargap=0.15, template="plotly_white",
    )
    return fig


def plot_per_class_accuracy(table_df: pd.DataFrame) -> Figure:
    """Static version of per_class_accuracy_html: sorted bars (worst first), mean line, bars
    coloured by superclass when the table has one."""
    cols = _per_class_columns(table_df)
    if len(table_df) == 0:
        return _text_figure("no classes", "Per-class accuracy")
    df = table_df.sort_values([cols["acc"], cols["name"]], kind="stable").reset_index(drop=True)
    C = len(df)
    fig = Figure(figsize=(max(8.0, 0.2 * C + 2.5), 5.5), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(C)
    acc = df[cols["acc"]].to_numpy(dtype=np.float64)
    handles = None
    if cols["super"]:
        groups = sorted(set(df[cols["super"]].astype(str)))
        palette = _class_colours(len(groups))
        gi = {g: i for i, g in enumerate(groups)}
        colours = [palette[gi[g]] for g in df[cols["super"]].astype(str)]
        from matplotlib.patches import Patch
        handles = [Patch(color=palette[i], label=g) for i, g in enumerate(groups)]
    else:
        colours = ["#4c72b0"] * C
    ax.bar(x, acc, color=colours, width=0.85)
    mean_acc = float(acc.mean())
    ax.axhline(mean_acc, color="black", ls="--", lw=1, label=f"mean accuracy {mean_acc:.1%}")
    ax.set_xticks(x, labels=df[cols["name"]].astype(str).tolist(), rotation=90,
                  fontsize=6 if C > 40 else 8)
    ax.set_xlim(-0.6, C - 0.4)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_xlabel("class (sorted by accuracy)")
    ax.set_title(f"Per-class accuracy ({C} classes, worst first) — mean {mean_acc:.1%}")
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.grid(axis="y", alpha=0.3)
    mean_handle = ax.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=mean_handle + handles, fontsize=7, ncols=2 if len(handles) > 10 else 1,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), title="superclass", title_fontsize=8)
    else:
        ax.legend(loc="upper left", fontsize=8)
    return fig


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
    cmap, norm = _cmap("RdBu_r"), mcolors.Normalize(vmin=-1, vmax=1)
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

def _name_lookup(names: Sequence[str], class_ids: Sequence[int]) -> Callable[[int], str]:
    """id -> display name. `names` is either every class's name indexed by id, or one name per
    entry of class_ids."""
    names = list(names)
    ids = [int(c) for c in class_ids]
    if all(0 <= c < len(names) for c in ids):
        return lambda i: names[i] if 0 <= i < len(names) else f"class {i}"
    if len(names) == len(ids):
        table = dict(zip(ids, names))
        return lambda i: table.get(i, f"class {i}")
    raise ValueError("names must list every class (indexed by id) or one name per entry of class_ids")


def _embedding_inputs(coords, labels, preds, class_ids):
    coords = np.asarray(coords, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(labels) or len(labels) != len(preds):
        raise ValueError(f"coords must be (N,2) with N labels and preds, got {coords.shape}, "
                         f"{labels.shape}, {preds.shape}")
    ids = list(dict.fromkeys(int(c) for c in class_ids))
    ids += [c for c in dict.fromkeys(labels.tolist()) if c not in ids]  # classes not listed still show
    return coords, labels, preds, ids


def plot_embedding(coords: np.ndarray, labels: np.ndarray, preds: np.ndarray, class_ids: Sequence[int],
                   names: Sequence[str], method: str) -> Figure:
    """2-D embedding (UMAP / t-SNE) of the features: one colour per true class, misclassified
    images drawn as '×' in their true class's colour."""
    coords, labels, preds, ids = _embedding_inputs(coords, labels, preds, class_ids)
    name = _name_lookup(names, class_ids)
    if len(coords) == 0:
        return _text_figure("no points", f"{method} embedding")
    fig = Figure(figsize=(10, 7.5), layout="constrained")
    ax = fig.add_subplot()
    colours = _class_colours(len(ids))
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


def thumbnail_data_uri(image: np.ndarray, size: int = 64) -> str:
    """`image` as a PNG data: URI, at most size×size. Larger images are shrunk (bilinear) to fit; smaller ones
    keep their own pixels, which the page scales up crisply (image-rendering: pixelated), so a 32×32 CIFAR
    image costs a quarter of the bytes and encoding time of a 64×64 copy and shows exactly the same."""
    img = _as_rgb_uint8(image)
    h, w = img.shape[:2]
    if max(h, w) > size:
        s = size / max(h, w)
        img = np.asarray(Image.fromarray(img).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR))
    return "data:image/png;base64," + base64.b64encode(png.png_bytes(img, level=6)).decode("ascii")


# Shows the hovered point's thumbnail in the fixed side panel (Plotly hover labels cannot show
# <img>). `{plot_id}` is filled in by plotly's to_html with the id of the plot's div.
_HOVER_JS = """
(function () {
  var plot = document.getElementById('{plot_id}');
  function show(ev) {
    var pt = ev.points[0];
    var i = pt.customdata[0];
    var img = document.getElementById('emb-thumb');
    var cap = document.getElementById('emb-caption');
    if (window.EMB_THUMBS && window.EMB_THUMBS[i]) { img.src = window.EMB_THUMBS[i]; img.style.visibility = 'visible'; }
    cap.textContent = 'true: ' + pt.customdata[1] + ' \\u00b7 predicted: ' + pt.customdata[2]
                      + (pt.customdata[1] === pt.customdata[2] ? ' (correct)' : ' (wrong)');
  }
  plot.on('plotly_hover', show);
  plot.on('plotly_click', show);
})();
"""


def embedding_html(coords: np.ndarray, labels: np.ndarray, preds: np.ndarray, class_ids: Sequence[int],
                   names: Sequence[str], thumbnails: Sequence[str], method: str,
                   separability_text: str, plotlyjs="inline") -> str:
    """Self-contained interactive embedding page: Plotly scatter (one trace per true class,
    misclassified as '×'), hover label with the true and predicted class, and the hovered image's
    thumbnail in a side panel (a `plotly_hover` listener; thumbnails are data: URIs from
    thumbnail_data_uri, one per point, or an empty list). Works offline: plotly.js is inlined, or
    loaded from the relative path `plotlyjs` (e.g. "../plotly.min.js")."""
    import plotly.graph_objects as go

    coords, labels, preds, ids = _embedding_inputs(coords, labels, preds, class_ids)
    name = _name_lookup(names, class_ids)
    thumbnails = list(thumbnails or [])
    if thumbnails and len(thumbnails) != len(coords):
        raise ValueError(f"{len(thumbnails)} thumbnails for {len(coords)} points")
    scatter = go.Scattergl if len(coords) > 3000 else go.Scatter  # WebGL keeps big sets responsive
    colours = [mcolors.to_hex(c) for c in _class_colours(len(ids))]
    fig = go.Figure()
    index = np.arange(len(coords))
    for colour, c in zip(colours, ids):
        m = labels == c
        wrong = preds[m] != c
        custom = [[int(i), name(c), name(int(p))] for i, p in zip(index[m], preds[m])]
        fig.add_trace(scatter(
            x=coords[m, 0], y=coords[m, 1], mode="markers", name=f"{name(c)} ({int(m.sum())})",
            customdata=custom,
            marker=dict(color=colour, size=np.where(wrong, 9, 6).tolist(),
                        symbol=np.where(wrong, "x", "circle").tolist(), opacity=0.8),
            hovertemplate="true: %{customdata[1]}<br>predicted: %{customdata[2]}<extra></extra>"))
    fig.add_trace(scatter(x=[None], y=[None], mode="markers", name="× = misclassified",
                          marker=dict(color="#444", symbol="x", size=9), hoverinfo="skip"))
    fig.update_layout(title=f"{method} of penultimate-layer features ({len(coords)} images)",
                      xaxis_title=f"{method} 1", yaxis_title=f"{method} 2", height=700,
                      legend=dict(title="true class"), template="plotly_white", hovermode="closest")
    plot_div = fig.to_html(include_plotlyjs=_include_plotlyjs(plotlyjs), full_html=False, post_script=_HOVER_JS,
                           default_height="700px", config=PLOTLY_CONFIG)
    # "</" inside a <script> would end it early; JSON allows the escaped form
    thumbs_js = json.dumps(thumbnails).replace("</", "<\\/")
    title = html.escape(f"{method} embedding")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
  body {{ font-family: "DejaVu Sans", Arial, sans-serif; margin: 16px; }}
  .layout {{ display: flex; gap: 16px; align-items: flex-start; }}
  .plot {{ flex: 1 1 auto; min-width: 0; }}
  .side {{ position: sticky; top: 16px; width: 200px; flex: 0 0 200px; border: 1px solid #ccc;
           padding: 10px; text-align: center; }}
  #emb-thumb {{ width: 160px; height: 160px; image-rendering: pixelated; visibility: hidden;
                border: 1px solid #ddd; }}
  .note {{ color: #333; white-space: pre-wrap; }}
</style>
</head>
<body>
<h2>{title}</h2>
<p class="note">{html.escape(separability_text or "")}</p>
<script>window.EMB_THUMBS = {thumbs_js};</script>
<div class="layout">
  <div class="plot">{plot_div}</div>
  <div class="side">
    <div><b>hovered image</b></div>
    <img id="emb-thumb" alt="thumbnail of the hovered image">
    <div id="emb-caption">hover over a point</div>
  </div>
</div>
</body>
</html>
"""


# ----------------------------------------------------------------------------------------------
# Plotly pages: shared plotly.js, the interactive confusion matrix
# ----------------------------------------------------------------------------------------------

# No "Produced with Plotly" logo link and no "Share chart" (uploads to Plotly Cloud): the report pages
# make no request off the disk.
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["sendChartToCloud"]}

CONFUSION_VIEWS = ("counts", "row %", "row %, errors only")


def _include_plotlyjs(plotlyjs):
    """Map plotlyjs ("inline", a relative .js path, or None when the page loads it itself) to
    plotly's include_plotlyjs. CDN addresses are refused: the pages must open offline."""
    if plotlyjs in ("inline", True):
        return True
    if plotlyjs in (None, False):
        return False
    if isinstance(plotlyjs, str) and plotlyjs.endswith(".js") and ":" not in plotlyjs and not plotlyjs.startswith("//"):
        return plotlyjs
    raise ValueError(f"plotlyjs must be 'inline', None or a relative path to a .js file, got {plotlyjs!r}")


def plotly_div(fig, div_id: str) -> str:
    """A figure as a <div> plus its drawing script, for a page that loads plotly.js itself."""
    return fig.to_html(include_plotlyjs=False, full_html=False, div_id=div_id, config=PLOTLY_CONFIG)


def _json_ready(z: np.ndarray) -> list:
    """NaN -> None, so the cell is blank in the heatmap and valid JSON in the page."""
    if np.asarray(z).dtype.kind in "iub":
        return np.asarray(z).tolist()
    z = np.asarray(z, dtype=np.float64)
    return np.where(np.isnan(z), None, z).tolist()


def confusion_heatmap_figure(cm: np.ndarray, row_pct: np.ndarray, names: Sequence[str], order: Sequence[int],
                             superclasses: Optional[Sequence[str]] = None,
                             spans: Optional[Sequence[tuple[int, int, int]]] = None, title: str = ""):
    """Interactive confusion matrix (Plotly heatmap), rows = true class, columns = prediction, both
    permuted by `order` (helpers.compute.ordering). Hover gives true, predicted, count and row %. Buttons
    switch the colour between CONFUSION_VIEWS: counts, row %, and row % with the diagonal blanked
    (so the errors use the whole colour range). superclasses: each class's superclass name, shown on
    hover; spans: (start, stop, id) runs along `order`, outlined as diagonal blocks.
    row_pct: NaN on rows of classes without test images."""
    import plotly.graph_objects as go

    cm = np.asarray(cm)
    n = len(cm)
    order = np.asarray(order, dtype=np.int64)
    if cm.shape != (n, n) or np.shape(row_pct) != (n, n) or sorted(order.tolist()) != list(range(n)):
        raise ValueError(f"cm and row_pct must be n x n and order a permutation of range(n) (n={n})")
    counts = cm[np.ix_(order, order)]
    pct = np.asarray(row_pct, dtype=np.float64)[np.ix_(order, order)]
    errors = pct.copy()
    np.fill_diagonal(errors, np.nan)
    labels = [str(names[i]) for i in order]
    # Category values carry the hover name (with the superclass); the tick text stays short.
    full = [f"{labels[k]} · {superclasses[i]}" for k, i in enumerate(order)] if superclasses is not None else labels
    if len(set(full)) < n:
        full = [f"{f} (#{i})" for f, i in zip(full, order)]
    pct_text = np.where(np.isnan(pct), "n/a (no images)", np.char.mod("%.1f%%", np.nan_to_num(pct)))
    # One object array, not nested lists: plotly validates and deep-copies lists element by element (10,000
    # cells x 2 for 100 classes took ~0.3 s).
    custom = np.empty((n, n, 2), dtype=object)
    custom[..., 0] = counts.astype(np.int64).tolist()
    custom[..., 1] = pct_text.tolist()

    def zmax(z) -> float:
        finite = z[np.isfinite(z)]
        return float(finite.max()) if finite.size and finite.max() > 0 else 1.0

    views = [(counts, "count"), (np.round(pct, 1), "row %"), (np.round(errors, 1), "row %<br>(errors)")]
    buttons = [dict(label=label, method="restyle",
                    args=[{"z": [_json_ready(z)], "zmax": [zmax(z)], "colorbar.title.text": bar}])
               for label, (z, bar) in zip(CONFUSION_VIEWS, views)]
    fig = go.Figure(go.Heatmap(
        z=_json_ready(views[0][0]), x=full, y=full, customdata=custom,
        zmin=0, zmax=zmax(views[0][0]), colorscale="Blues", colorbar=dict(title=dict(text="count")),
        hovertemplate="true: %{y}<br>predicted: %{x}<br>count: %{customdata[0]}"
                      "<br>row %: %{customdata[1]}<extra></extra>",
        texttemplate="%{z}" if n <= 20 else None))   # few classes: the value is written in each cell
    for start, stop, _ in spans or []:
        fig.add_shape(type="rect", x0=start - 0.5, x1=stop - 0.5, y0=start - 0.5, y1=stop - 0.5,
                      line=dict(color="#d62728", width=1), fillcolor="rgba(0,0,0,0)")
    font = 12 if n <= 20 else 10 if n <= 50 else 8
    cell = 48 if n <= 12 else 32 if n <= 20 else 16 if n <= 50 else 9   # 100 classes: 9-px rows, every name shown
    axis = dict(type="category", tickmode="array", tickvals=full, ticktext=labels, tickfont=dict(size=font),
                showgrid=False, zeroline=False, range=[-0.5, n - 0.5])
    fig.update_layout(
        title=dict(text=title, x=0, xanchor="left"), template="plotly_white",
        height=max(460, cell * n + 260), margin=dict(l=40, r=40, t=110, b=40),
        xaxis=dict(axis, title="predicted class", tickangle=-90, constrain="domain"),
        yaxis=dict(axis, title="true class", autorange=False, range=[n - 0.5, -0.5], scaleanchor="x",
                   constrain="domain"),
        updatemenus=[dict(type="buttons", direction="right", active=0, showactive=True, buttons=buttons,
                          x=1, xanchor="right", y=1.0, yanchor="bottom", pad=dict(b=30))],
    )
    return fig


def confusion_heatmap_html(fig, plotlyjs="plotly.min.js") -> str:
    """confusion_heatmap_figure as a full page that opens offline (plotly.js: see _include_plotlyjs)."""
    return fig.to_html(include_plotlyjs=_include_plotlyjs(plotlyjs), full_html=True, config=PLOTLY_CONFIG,
                       div_id="confusion-matrix")


# ----------------------------------------------------------------------------------------------
# Deep dive: occlusion, calibration, label suspects
# ----------------------------------------------------------------------------------------------

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
        axes[r, 0].imshow(_as_rgb_uint8(images[r]), interpolation="nearest")
        axes[r, 0].set_title(titles[r], fontsize=9, loc="left")
        axes[r, 1].imshow(_as_rgb_uint8(cam_overlays[r]), interpolation="bilinear")
        lo, hi = float(np.nanmin(occ)), float(np.nanmax(occ))
        if lo < 0:  # both signs: centre the diverging map at 0 (blue = hiding it RAISES the score)
            m = max(abs(lo), abs(hi), 1e-9)
            im = axes[r, 2].imshow(occ, cmap=_cmap("RdBu_r"), vmin=-m, vmax=m, interpolation="nearest")
        else:
            im = axes[r, 2].imshow(occ, cmap=_cmap("inferno"), vmin=0, vmax=max(hi, 1e-9),
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
    for c in ("bin_lower", "bin_upper", "count", "accuracy", "confidence"):
        _col(bins_df, c)
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


SUSPECT_TILE = 200   # px per image in the label-suspects grid (room for "model: aquarium fish (p=0.97)")
SUSPECT_CAPTION_H = 36   # two caption lines above each image


def render_label_suspects(images: Sequence[np.ndarray], given_names: Sequence[str],
                          predicted_names: Sequence[str], probs_given: Sequence[float],
                          probs_pred: Sequence[float], ncols: int = 6, tile: int = SUSPECT_TILE) -> Image.Image:
    """Grid (RGB PIL.Image) of possibly mislabelled test images, at most the first 24 in the order
    given, each captioned "label: X (p=…)" (red) over "model: Y (p=…)" (black). Composed with
    numpy/PIL like the galleries: a matplotlib grid of 24 axes cost ~1 s to lay out and render.

    Size: width = max(LAYOUT.min_width, 2*pad + ncols*tile + (ncols-1)*gap), height = 2*pad + title_h +
    rows*(SUSPECT_CAPTION_H + tile + row_gap), rows = ceil(n / ncols); n = 0 gives a one-line picture."""
    L = LAYOUT
    n = min(24, len(images))
    if not (len(given_names) >= n and len(predicted_names) >= n and len(probs_given) >= n
            and len(probs_pred) >= n):
        raise ValueError("given_names, predicted_names, probs_given and probs_pred must cover every image")
    ncols = max(1, min(ncols, n)) if n else 1
    nrows = -(-n // ncols)
    cell_h = SUSPECT_CAPTION_H + tile + L.row_gap
    width = max(L.min_width, 2 * L.pad + ncols * tile + (ncols - 1) * L.gap)
    height = 2 * L.pad + L.title_h + nrows * cell_h
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    title_font, caption_font = _font(16, bold=True), _font(11)
    title = (f"Possible label errors: the model confidently disagrees with the label ({n} shown)" if n
             else "Possible label errors: none (the model never confidently contradicts a label)")
    texts = [((L.pad, L.pad + 2), _fit_text(title, title_font, width - 2 * L.pad), title_font, _BLACK, "lt")]
    for k in range(n):
        r, c = divmod(k, ncols)
        x = L.pad + c * (tile + L.gap)
        y = L.pad + L.title_h + r * cell_h
        texts.append(((x + tile // 2, y + 1), _fit_text(f"label: {given_names[k]} (p={float(probs_given[k]):.2f})",
                                                         caption_font, tile), caption_font, _RED, "mt"))
        texts.append(((x + tile // 2, y + 17), _fit_text(f"model: {predicted_names[k]} (p={float(probs_pred[k]):.2f})",
                                                          caption_font, tile), caption_font, _BLACK, "mt"))
        img = _as_rgb_uint8(images[k])
        disp_h, disp_w = _display_size(*img.shape[:2], tile)
        _place_tile(canvas, _resize(img, (disp_h, disp_w), smooth=False), x, y + SUSPECT_CAPTION_H, tile)
    out = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(out)
    for xy, text, font, colour, anchor in texts:
        draw.text(xy, text, font=font, fill=colour, anchor=anchor)
    return out


# ----------------------------------------------------------------------------------------------
# Comparing two checkpoints (helpers.compare computes the tables)
# ----------------------------------------------------------------------------------------------

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
