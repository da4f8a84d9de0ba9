"""The report's confusion-cell images: one tile per image (the image | CAM for the true class | CAM for the
predicted class), packed into a few JPEG sprite sheets that index.html draws from lazily, on the first click."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from helpers.files.png import jpeg_data_uri
from helpers.plots.overlay import to_rgb_uint8

PANELS = 3              # image, true-class CAM, predicted-class CAM
MAX_SIDE = 64           # thumbnails larger than this are shrunk; CIFAR's 32 px stay pixel for pixel
SHEET_WIDTH = 2048      # px; at most TILES_PER_SHEET tiles per sheet keeps one decoded sheet small
TILES_PER_SHEET = 512
SHEET_QUALITY = 90      # tiles are viewed enlarged: JPEG's loss shows sooner than on a figure


@dataclass(frozen=True)
class TileSheets:
    """tile k lies on sheets[k // per_sheet] at column (k % per_sheet) % per_row, row (k % per_sheet) // per_row;
    each tile is PANELS * side wide and side high."""
    side: tuple[int, int]           # (width, height) of one panel
    per_row: int
    per_sheet: int
    sheets: list[str]               # JPEG data: URIs

    @property
    def size(self) -> int:
        return sum(len(s) for s in self.sheets)


def thumb_side(h: int, w: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    s = min(1.0, max_side / max(h, w))
    return max(1, round(w * s)), max(1, round(h * s))


def fit_thumbnails(images: Sequence[np.ndarray], side: tuple[int, int]) -> list[np.ndarray]:
    """Each image as uint8 RGB of size `side` (width, height): shrunk (bilinear) when larger, as is when equal."""
    out = []
    for img in images:
        img = to_rgb_uint8(img)
        out.append(img if (img.shape[1], img.shape[0]) == tuple(side)
                   else np.asarray(Image.fromarray(img).resize(tuple(side), Image.BILINEAR)))
    return out


def tile_sheets(images: Sequence[np.ndarray], true_overlays: Sequence[np.ndarray],
                pred_overlays: Sequence[np.ndarray], max_side: int = MAX_SIDE) -> TileSheets:
    """Pack each (image, true-class overlay, predicted-class overlay) triple into tiles on JPEG sheets
    (thumbnails: fit_thumbnails; already-fitted ones are used as they are)."""
    if not (len(images) == len(true_overlays) == len(pred_overlays)):
        raise ValueError(f"{len(images)} images, {len(true_overlays)} and {len(pred_overlays)} overlays")
    if not len(images):
        return TileSheets(side=(0, 0), per_row=1, per_sheet=TILES_PER_SHEET, sheets=[])
    h, w = np.asarray(images[0]).shape[:2]
    side = thumb_side(h, w, max_side)
    tw, th = PANELS * side[0], side[1]
    per_row = max(1, SHEET_WIDTH // tw)
    sheets = []
    for first in range(0, len(images), TILES_PER_SHEET):
        n = min(TILES_PER_SHEET, len(images) - first)
        rows = -(-n // per_row)
        sheet = np.full((rows * th, min(n, per_row) * tw, 3), 255, np.uint8)
        for k in range(n):
            r, c = divmod(k, per_row)
            i = first + k
            strip = np.concatenate(fit_thumbnails([a[i] for a in (images, true_overlays, pred_overlays)], side),
                                   axis=1)
            sheet[r * th:(r + 1) * th, c * tw:(c + 1) * tw] = strip
        sheets.append(jpeg_data_uri(sheet, quality=SHEET_QUALITY, full_colour=True))
    return TileSheets(side=side, per_row=per_row, per_sheet=TILES_PER_SHEET, sheets=sheets)
