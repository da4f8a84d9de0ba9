"""The PIL pages: the per-class and pair Grad-CAM galleries and the label-suspects grid.

Drawn with PIL + numpy instead of matplotlib because a run draws one per class, and matplotlib's layout and
rendering of each would outweigh the rest of the run. Every function only draws what it is given and returns a
PIL.Image (RGB) or pixels; the caller saves it (helpers.files.png.save_png). The CAM overlays arrive drawn
(helpers.plots.overlay).
"""
from __future__ import annotations

import functools
import textwrap
from dataclasses import dataclass, field
from typing import Optional, Sequence

import cv2
import numpy as np
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

from helpers.errors import ConfigError, NumericalError
from helpers.plots.common import colormap
from helpers.plots.fonts import drawn, fallback_files, glyphs
from helpers.plots.overlay import to_rgb_uint8

__all__ = ["GalleryRow", "GalleryLayout", "LAYOUT", "render_gallery", "difference_panel", "render_label_suspects",
           "SUSPECT_TILE", "SUSPECT_CAPTION_H"]


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
    title_line_h: int = 22   # each further line of a title too long for one (16 px bold)
    subtitle_line_h: int = 16
    row_title_line_h: int = 16


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


@functools.lru_cache(maxsize=8192)
def _font_for(text: str, size: int, bold: bool = False) -> tuple[str, ImageFont.FreeTypeFont]:
    """(text, font) that draws `text` without tofu boxes: DejaVu Sans when it has every glyph, else the first
    installed font that has them all (e.g. Noto Sans CJK for Chinese class names). When no font has them all,
    the font with the most, and each character it lacks is written as its code point "[U+6953]": visible, and
    two class names still read differently."""
    need = {ord(c) for c in text if drawn(c)}
    primary = _font(size, bold)
    have = glyphs(primary.path)
    if need <= have or not have:
        return text, primary
    best, best_have, missing = primary.path, have, len(need - have)
    for path in fallback_files(bold):
        found = glyphs(path)
        lacking = len(need - found)
        if lacking == 0:
            return text, _font_file(path, size)
        if lacking < missing:
            best, best_have, missing = path, found, lacking
    shown = "".join(c if not drawn(c) or ord(c) in best_have else f"[U+{ord(c):04X}]" for c in text)
    return shown, (primary if best == primary.path else _font_file(best, size))


@functools.lru_cache(maxsize=None)
def _font_file(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


@functools.lru_cache(maxsize=64)
def _colour_strip(cmap_name: str, width: int, height: int) -> np.ndarray:
    row = (colormap(cmap_name)(np.linspace(0.0, 1.0, width))[:, :3] * 255).round().astype(np.uint8)
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


@functools.lru_cache(maxsize=8192)
def _wrap_text(text: str, font: ImageFont.FreeTypeFont, max_w: int) -> tuple[str, ...]:
    """`text` in as few lines as fit in max_w pixels each, broken at spaces (inside a word only when the word
    alone is too wide): titles stay whole instead of ending in an ellipsis."""
    if font.getlength(text) <= max_w:
        return (text,)
    width = max(1, int(len(text) * max_w / font.getlength(text)))   # characters per line, a first guess
    while width > 1:
        lines = textwrap.wrap(text, width) or [text]
        if all(font.getlength(line) <= max_w for line in lines):
            return tuple(lines)
        width -= 1
    return tuple(text)


def _wrapped(text: str, size: int, max_w: int, bold: bool = False) -> tuple[tuple[str, ...], ImageFont.FreeTypeFont]:
    shown, font = _font_for(text, size, bold)
    return _wrap_text(shown, font, max_w), font


@functools.lru_cache(maxsize=4096)
def _fit_label(label: str, max_w: int) -> tuple[str, ImageFont.FreeTypeFont]:
    """(text, font) of a tile label within max_w px: 11 px, else 10 px, else without the "CAM → " prefix
    (the row title names the classes too), else cut with an ellipsis. Class names stay whole when possible."""
    for text in (label, label.replace("CAM → ", "", 1)):
        for size in (11, 10):
            shown, font = _font_for(text, size)
            if font.getlength(shown) <= max_w:
                return shown, font
    shown, font = _font_for(label.replace("CAM → ", "", 1), 10)
    return _fit_text(shown, font, max_w), font


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
        # Bilinear upscale of a heat map (13 per gallery page): OpenCV's matches Pillow's to ±1 grey level and
        # is much faster.
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
    rgba = colormap("RdBu_r")((diff + 1.0) / 2.0)
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
                   subtitle: Optional[str] = None, colour_bar: bool = True) -> Image.Image:
    """A gallery picture (RGB PIL.Image): big title, optional subtitle, then for each section a
    heading and its rows; each row is a coloured title line, the original image and its panels
    (tiles of `tile` px; rows with fewer panels leave blanks). At the bottom, the JET colour bar of
    the CAM overlays, plus a RdBu_r bar when any panel label starts with "difference" (colour_bar=False: no
    bars, for pages of plain images).

    Size: width = max(LAYOUT.min_width, 2*pad + ncols*tile + (ncols-1)*gap), ncols = 1 + most panels;
    height = 2*pad + title_h [+ subtitle_h] + Σ_sections (section_h + rows*(row_title_h + label_h +
    tile + row_gap)) + cbar_h * (1 or 2; 0 without colour_bar), plus title_line_h, subtitle_line_h or
    row_title_line_h for each further line of a title that wraps (titles too wide at 20 px are drawn at 16 px and
    wrapped at spaces)."""
    L = LAYOUT
    if tile < 16:
        raise ConfigError(f"gallery tile must be at least 16 px, got {tile}")
    sections = [(str(h), list(rows)) for h, rows in sections]
    all_rows = [r for _, rows in sections for r in rows]
    ncols = 1 + max((len(r.panels) for r in all_rows), default=0)
    has_diff = colour_bar and any(lbl.lower().startswith("difference") for r in all_rows for lbl, _ in r.panels)
    width = max(L.min_width, 2 * L.pad + ncols * tile + (ncols - 1) * L.gap)
    text_w = width - 2 * L.pad
    # titles too long for one line wrap (and the page grows by a line each) instead of losing their end
    title_text, title_font = _font_for(title, 20, True)
    title_lines: tuple[str, ...] = (title_text,)
    if title_font.getlength(title_text) > text_w:
        title_lines, title_font = _wrapped(title, 16, text_w, True)
    sub_lines, sub_font = _wrapped(subtitle, 13, text_w) if subtitle else ((), None)
    row_lines = {id(r): _wrapped(r.title, 13, text_w, True) for r in all_rows}
    row_h = L.row_title_h + L.label_h + tile + L.row_gap
    row_extra = {key: (len(lines) - 1) * L.row_title_line_h for key, (lines, _) in row_lines.items()}

    height = (2 * L.pad + L.title_h + (len(title_lines) - 1) * L.title_line_h
              + (L.subtitle_h + (len(sub_lines) - 1) * L.subtitle_line_h if subtitle else 0)
              + sum(L.section_h + sum(row_h + row_extra[id(r)] for r in rows) for _, rows in sections)
              + L.cbar_h * ((2 if has_diff else 1) if colour_bar else 0))
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    # text is collected first and drawn in one ImageDraw pass after the pixels are in place
    texts: list = []  # ((x, y), text, font, colour, anchor)

    y = L.pad
    for i, line in enumerate(title_lines):
        texts.append(((L.pad, y + 2 + i * L.title_line_h), line, title_font, _BLACK, "lt"))
    y += L.title_h + (len(title_lines) - 1) * L.title_line_h
    if subtitle:
        for i, line in enumerate(sub_lines):
            texts.append(((L.pad, y + 1 + i * L.subtitle_line_h), line, sub_font, _GREY, "lt"))
        y += L.subtitle_h + (len(sub_lines) - 1) * L.subtitle_line_h

    for heading, rows in sections:
        shown, section_font = _font_for(heading if rows else f"{heading} — none", 16, True)
        texts.append(((L.pad, y + 4), _fit_text(shown, section_font, text_w), section_font, (40, 40, 40), "lt"))
        canvas[y + L.section_h - 3, L.pad:width - L.pad] = _FRAME  # rule under the heading
        y += L.section_h
        for row in rows:
            colour = _BLACK if row.ok is None else (_GREEN if row.ok else _RED)
            lines, row_font = row_lines[id(row)]
            for i, line in enumerate(lines):
                texts.append(((L.pad, y + 2 + i * L.row_title_line_h), line, row_font, colour, "lt"))
            y += row_extra[id(row)]
            tiles_y = y + L.row_title_h + L.label_h
            original = to_rgb_uint8(row.image)
            disp_h, disp_w = _display_size(*original.shape[:2], tile)
            # the original keeps crisp pixels; overlays are smooth heat maps, bilinear reads better
            items = [("input", original, False)] + [(lbl, to_rgb_uint8(p), True) for lbl, p in row.panels]
            for c, (label, img, smooth) in enumerate(items):
                x = L.pad + c * (tile + L.gap)
                text, font = _fit_label(label, tile)
                texts.append(((x + tile // 2, y + L.row_title_h + 1), text, font, _BLACK, "mt"))
                _place_tile(canvas, _resize(img, (disp_h, disp_w), smooth), x, tiles_y, tile)
            y += row_h

    if colour_bar:
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


SUSPECT_TILE = 200   # px per image in the label-suspects grid (room for "model: aquarium fish (p=0.97)")
SUSPECT_CAPTION_H = 36   # two caption lines above each image


def render_label_suspects(images: Sequence[np.ndarray], given_names: Sequence[str],
                          predicted_names: Sequence[str], probs_given: Sequence[float],
                          probs_pred: Sequence[float], ncols: int = 6, tile: int = SUSPECT_TILE) -> Image.Image:
    """Grid (RGB PIL.Image) of possibly mislabelled test images, at most the first 24 in the order
    given, each captioned "label: X (p=…)" (red) over "model: Y (p=…)" (black). Composed with
    numpy/PIL like the galleries: a matplotlib grid of 24 axes is slow to lay out and render.

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
    title_font = _font(16, bold=True)
    title = (f"Possible label errors: the model confidently disagrees with the label ({n} shown)" if n
             else "Possible label errors: none (the model never confidently contradicts a label)")
    texts = [((L.pad, L.pad + 2), _fit_text(title, title_font, width - 2 * L.pad), title_font, _BLACK, "lt")]
    for k in range(n):
        r, c = divmod(k, ncols)
        x = L.pad + c * (tile + L.gap)
        y = L.pad + L.title_h + r * cell_h
        for dy, colour, caption in ((1, _RED, f"label: {given_names[k]} (p={float(probs_given[k]):.2f})"),
                                    (17, _BLACK, f"model: {predicted_names[k]} (p={float(probs_pred[k]):.2f})")):
            shown, font = _font_for(caption, 11)
            texts.append(((x + tile // 2, y + dy), _fit_text(shown, font, tile), font, colour, "mt"))
        img = to_rgb_uint8(images[k])
        disp_h, disp_w = _display_size(*img.shape[:2], tile)
        _place_tile(canvas, _resize(img, (disp_h, disp_w), smooth=False), x, y + SUSPECT_CAPTION_H, tile)
    out = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(out)
    for xy, text, font, colour, anchor in texts:
        draw.text(xy, text, font=font, fill=colour, anchor=anchor)
    return out

