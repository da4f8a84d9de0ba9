"""The report's confusion-matrix explorer as HTML: controls, the Plotly div, the cell-images panel, the numbers
as JSON and the tile sheets, plus explorer.js, which draws it all in the page (no request is made)."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from helpers.plots.cell_tiles import TileSheets
from helpers.plots.interactive import PLOTLY_CONFIG, plotly_text, script_json

EXPLORER_JS = Path(__file__).with_name("explorer.js")
TOP_N = (20, 50, 100, 200)   # the "top N most confused" views offered (those below the class count)
ALL_MAX = 300                # up to this many classes, "all classes" is offered; above, a full matrix is unreadable
DEFAULT_ALL = 100            # up to this many, it is the default view; above, the top 50
PARTNERS = 15                # a searched class is shown with this many of the classes it is confused with


def colorscale(name: str) -> list:
    """A plotly (Python) sequential scale as [[position, colour], ...]: plotly.js's own "Blues" runs the other
    way (dark at zero), so the page is given the colours the full matrix uses."""
    from plotly.colors import sequential
    cols = getattr(sequential, name)
    return [[k / (len(cols) - 1), c] for k, c in enumerate(cols)]


def explorer_data(cm: np.ndarray, names: Sequence[str], order: Sequence[int], cells: np.ndarray,
                  shown: np.ndarray, per_cell: int, budget: int, tiles: TileSheets, p_pred: np.ndarray,
                  p_true: np.ndarray,
                  groups: Optional[np.ndarray] = None, group_names: Optional[Sequence[str]] = None,
                  group_kind: str = "superclass", images_note: str = "") -> dict:
    """Everything explorer.js reads, as plain JSON values. groups: a group id per class (superclasses or
    clusters) with their names, for the collapsed view; None: no collapsed view. cells: one row per non-empty
    off-diagonal cell, (true, pred, count, offset, n_shown) into `shown`, the image indices of the tiles, whose
    confidences are p_pred and p_true (compute.cells.CellExamples.table()). images_note: what a click on a cell
    says when the page holds no images at all (e.g. where they are instead)."""
    cm = np.asarray(cm, dtype=np.int64)
    n = len(cm)
    flat = np.asarray(cells, dtype=np.int64).reshape(-1, 5)
    data = {
        "n": n, "names": [str(s) for s in names], "labels": [plotly_text(s) for s in names],
        "order": [int(i) for i in order], "support": cm.sum(axis=1).tolist(), "correct": np.diag(cm).tolist(),
        "cells": flat.ravel().tolist(), "per_cell": int(per_cell), "budget": int(budget),
        "images": {"idx": np.asarray(shown, dtype=np.int64).tolist(), "p_pred": np.round(np.asarray(p_pred, float), 4).tolist(),
                   "p_true": np.round(np.asarray(p_true, float), 4).tolist()},
        "tiles": {"w": tiles.side[0], "h": tiles.side[1], "per_row": tiles.per_row, "per_sheet": tiles.per_sheet},
        "groups": None, "group_kind": group_kind, "group_labels": [], "group_labels_plain": [],
        "top_n": list(TOP_N), "all_max": ALL_MAX, "partners": PARTNERS,
        "default_scope": "all" if n <= DEFAULT_ALL else "top50",
        "config": PLOTLY_CONFIG, "colorscale": colorscale("Blues"), "images_note": str(images_note),
    }
    if groups is not None and group_names is not None:
        data["groups"] = [int(g) for g in groups]
        data["group_labels"] = [plotly_text(g) for g in group_names]
        data["group_labels_plain"] = [str(g) for g in group_names]
    return data


def explorer_html(data: dict, sheets: Sequence[str]) -> str:
    """The explorer's markup and scripts (the page loads plotly.js before it). Hidden without scripts
    (class "js-only"; the page shows its static figures instead)."""
    sheet_tags = "".join(f'<script type="text/plain" id="cell-sheet-{k}">{uri}</script>' for k, uri in enumerate(sheets))
    return f"""<div class="cm-controls js-only">
<label>Classes <select id="cm-scope"></select></label>
<label>Colour <select id="cm-colour"><option value="counts">counts</option><option value="pct">row %</option>
<option value="errors">row %, errors only</option></select></label>
<label>Find a class <input id="cm-search" list="cm-names" placeholder="class name" autocomplete="off"></label>
<datalist id="cm-names"></datalist>
<span id="cm-showing" class="note"></span></div>
<div id="confusion-matrix" class="plotly-graph-div js-only"></div>
<div id="cell-images" class="js-only"><p class="note">Click a cell off the diagonal, or a row of the pairs table,
to see its images here: worst first, each with the CAM for the true class and for the predicted class.</p></div>
<script type="application/json" id="cm-data">{script_json(data)}</script>
{sheet_tags}
<script>{EXPLORER_JS.read_text(encoding="utf-8")}</script>"""


def cells_table(cm: np.ndarray) -> np.ndarray:
    """explorer_data's `cells` for a page without images: every non-empty off-diagonal cell (true, pred, count,
    0, 0), the largest first."""
    cm = np.asarray(cm, dtype=np.int64)
    off = cm - np.diag(np.diag(cm))
    t, q = np.nonzero(off)
    by_size = np.lexsort((q, t, -off[t, q]))
    t, q = t[by_size], q[by_size]
    zeros = np.zeros(len(t), np.int64)
    return np.stack([t, q, off[t, q], zeros, zeros], axis=1)


def explorer_page(data: dict, title: str, plotlyjs: str = "plotly.min.js") -> str:
    """The explorer alone as a full page (no cell images), loading plotly.js from the relative path `plotlyjs`:
    the interactive matrix of a label set too large to draw whole (top N, groups, search)."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:"DejaVu Sans",Arial,sans-serif;max-width:1240px;margin:0 auto;padding:0 16px 40px;color:#222}}
.note{{color:#444}}{EXPLORER_CSS}</style>
<script src="{html.escape(plotlyjs)}"></script></head>
<body><h1>{html.escape(title)}</h1>
{explorer_html(data, [])}
</body></html>
"""


EXPLORER_CSS = """
.cm-controls{display:flex;flex-wrap:wrap;gap:14px;align-items:center;margin:8px 0}
.cm-controls select,.cm-controls input{font:inherit;padding:2px 4px}
#cell-images{border:1px solid #ddd;border-radius:6px;padding:8px 12px;margin-top:10px;background:#fafbfd}
.cell-title{font-weight:bold;font-size:1.1em}
.cell-grid{display:flex;flex-wrap:wrap;gap:10px}
.cell-item{margin:0}.cell-item figcaption{font-size:.8em;color:#444;max-width:300px}
canvas.cell-tile{image-rendering:pixelated;border:1px solid #ccc;display:block}
tr[data-true]{cursor:pointer}tr[data-true]:hover{background:#eef3fb}
"""
