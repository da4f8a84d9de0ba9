"""The interactive (Plotly / HTML) pages: per-class accuracy, the confusion heatmap of index.html and its own
page, and the feature-space embedding with hover thumbnails. Every function only draws what it is given and
returns a Plotly figure or an HTML string; the caller writes it. Pages open offline: plotly.js is inlined or
loaded from a relative path, never from a CDN.
"""
from __future__ import annotations

import html
import json
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib import colors as mcolors

from helpers.files.png import png_data_uri
from helpers.plots.cell_tiles import fit_thumbnails, thumb_side
from helpers.plots.common import class_colours, embedding_inputs, name_lookup, require_columns
from helpers.plots.overlay import to_rgb_uint8

__all__ = ["per_class_accuracy_figure", "per_class_accuracy_html", "confusion_heatmap_figure", "confusion_heatmap_html",
           "embedding_html", "thumbnail_data_uri", "plotly_div", "script_json", "include_plotlyjs", "plotly_text",
           "PLOTLY_CONFIG", "CONFUSION_VIEWS"]

# The optional columns of metrics.per_class_table that the chart shows when the table has them.
_PER_CLASS_OPTIONAL = ("superclass", "support", "correct", "mean_confidence", "top_wrong_prediction", "top_wrong_count")


def plotly_text(value) -> str:
    """A name (class, superclass) as Plotly text. Plotly draws a subset of HTML in every text it shows (tick
    labels, categories, legend and trace names, hover labels): <a href> becomes a live link, <b>/<br> restyle it.
    Escaping <, > and & makes it literal; Plotly decodes &lt; &gt; &amp; back for display. Quotes stay as they
    are: they mean nothing outside a tag, and Plotly would show &quot; literally."""
    return html.escape(str(value), quote=False)


def script_json(value) -> str:
    """JSON for a page's <script> (data or code): <, > and & as \\u escapes, so no name can end the script
    early or read as markup anywhere in the page's text."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and np.isnan(v)) and str(v) != ""


def per_class_accuracy_html(table_df: pd.DataFrame, plotlyjs="inline", fig=None) -> str:
    """per_class_accuracy_figure as a full HTML page that opens offline. plotlyjs: "inline" embeds
    plotly.js (self-contained, ~4.8 MB); a relative path such as "plotly.min.js" loads the copy
    shipped next to the page instead (see include_plotlyjs). fig: that figure when already built."""
    return (fig if fig is not None else per_class_accuracy_figure(table_df)).to_html(
        include_plotlyjs=include_plotlyjs(plotlyjs), full_html=True, config=PLOTLY_CONFIG)


def per_class_accuracy_figure(table_df: pd.DataFrame):
    """Interactive (Plotly) bar chart of per-class accuracy, worst class first, coloured by
    superclass when the table has one, dashed line at the mean (macro) accuracy; hover shows class,
    superclass, accuracy, correct/support, mean confidence, top wrong prediction and its count.
    Columns (metrics.per_class_table): class_name, accuracy (0–1); optional superclass, support, correct,
    mean_confidence, top_wrong_prediction, top_wrong_count."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative   # plotly.express would import only to hand over these palettes

    require_columns(table_df, ("class_name", "accuracy"), "the per-class table")
    has = {c for c in _PER_CLASS_OPTIONAL if c in table_df.columns}
    df = table_df.sort_values(["accuracy", "class_name"], kind="stable").reset_index(drop=True)
    hover = []
    for _, r in df.iterrows():
        lines = [f"<b>{plotly_text(r['class_name'])}</b>"]
        if "superclass" in has and _present(r["superclass"]):
            lines.append(f"superclass: {plotly_text(r['superclass'])}")
        lines.append(f"accuracy: {float(r['accuracy']):.1%}")
        if {"correct", "support"} <= has:
            lines.append(f"correct: {int(r['correct'])}/{int(r['support'])}")
        elif "support" in has:
            lines.append(f"images: {int(r['support'])}")
        if "mean_confidence" in has and _present(r["mean_confidence"]):
            lines.append(f"mean confidence: {float(r['mean_confidence']):.2f}")
        if "top_wrong_prediction" in has and _present(r["top_wrong_prediction"]):
            n_wrong = (f" ({int(r['top_wrong_count'])}×)"
                       if "top_wrong_count" in has and _present(r["top_wrong_count"]) else "")
            lines.append(f"most often predicted instead: {plotly_text(r['top_wrong_prediction'])}{n_wrong}")
        hover.append("<br>".join(lines))
    df["_hover"] = hover
    # Categories, tick labels and legend entries are Plotly text too: escaped like the hover.
    df["_category"] = [plotly_text(c) for c in df["class_name"]]

    fig = go.Figure()
    order = df["_category"].tolist()
    if "superclass" in has:
        groups = sorted(set(df["superclass"].astype(str)))
        palette = qualitative.Dark24 + qualitative.Light24
        for gi, g in enumerate(groups):
            sub = df[df["superclass"].astype(str) == g]
            fig.add_trace(go.Bar(x=sub["_category"], y=sub["accuracy"], name=plotly_text(g),
                                 marker_color=palette[gi % len(palette)], hovertext=sub["_hover"],
                                 hovertemplate="%{hovertext}<extra></extra>"))
    else:
        fig.add_trace(go.Bar(x=order, y=df["accuracy"], name="accuracy", marker_color="#4c72b0",
                             hovertext=df["_hover"], hovertemplate="%{hovertext}<extra></extra>",
                             showlegend=False))
    mean_acc = float(df["accuracy"].mean()) if len(df) else float("nan")
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


# ----------------------------------------------------------------------------------------------
# Embedding page
# ----------------------------------------------------------------------------------------------

def thumbnail_data_uri(image: np.ndarray, size: int = 64) -> str:
    """`image` as a PNG data: URI, at most size×size. Larger images are shrunk (bilinear) to fit; smaller ones
    keep their own pixels, which the page scales up crisply (image-rendering: pixelated), so a 32×32 CIFAR
    image costs a quarter of the bytes and encoding time of a 64×64 copy and shows exactly the same."""
    img = to_rgb_uint8(image)
    return png_data_uri(fit_thumbnails([img], thumb_side(*img.shape[:2], size))[0])


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

    coords, labels, preds, ids = embedding_inputs(coords, labels, preds, class_ids)
    name = name_lookup(names, class_ids)
    thumbnails = list(thumbnails or [])
    if thumbnails and len(thumbnails) != len(coords):
        raise ValueError(f"{len(thumbnails)} thumbnails for {len(coords)} points")
    scatter = go.Scattergl if len(coords) > 3000 else go.Scatter  # WebGL keeps big sets responsive
    colours = [mcolors.to_hex(c) for c in class_colours(len(ids))]
    fig = go.Figure()
    index = np.arange(len(coords))
    for colour, c in zip(colours, ids):
        m = labels == c
        wrong = preds[m] != c
        # [index, true, predicted] as plain text for the side panel's caption (textContent), then the same
        # names escaped for the hover label, which Plotly draws as HTML (as it does the trace name).
        custom = [[int(i), name(c), name(int(p)), plotly_text(name(c)), plotly_text(name(int(p)))]
                  for i, p in zip(index[m], preds[m])]
        fig.add_trace(scatter(
            x=coords[m, 0], y=coords[m, 1], mode="markers", name=f"{plotly_text(name(c))} ({int(m.sum())})",
            customdata=custom,
            marker=dict(color=colour, size=np.where(wrong, 9, 6).tolist(),
                        symbol=np.where(wrong, "x", "circle").tolist(), opacity=0.8),
            hovertemplate="true: %{customdata[3]}<br>predicted: %{customdata[4]}<extra></extra>"))
    fig.add_trace(scatter(x=[None], y=[None], mode="markers", name="× = misclassified",
                          marker=dict(color="#444", symbol="x", size=9), hoverinfo="skip"))
    fig.update_layout(title=f"{method} of penultimate-layer features ({len(coords)} images)",
                      xaxis_title=f"{method} 1", yaxis_title=f"{method} 2", height=700,
                      legend=dict(title="true class"), template="plotly_white", hovermode="closest")
    plot_div = fig.to_html(include_plotlyjs=include_plotlyjs(plotlyjs), full_html=False, post_script=_HOVER_JS,
                           default_height="700px", config=PLOTLY_CONFIG)
    thumbs_js = script_json(thumbnails)
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


def include_plotlyjs(plotlyjs):
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
    # Names are Plotly text (categories, ticks, hover): escaped, so a name cannot add a link or markup.
    labels = [plotly_text(names[i]) for i in order]
    # Category values carry the hover name (with the superclass); the tick text stays short.
    full = ([f"{labels[k]} · {plotly_text(superclasses[i])}" for k, i in enumerate(order)]
            if superclasses is not None else labels)
    if len(set(full)) < n:
        full = [f"{f} (#{i})" for f, i in zip(full, order)]
    pct_text = np.where(np.isnan(pct), "n/a (no images)", np.char.mod("%.1f%%", np.nan_to_num(pct)))
    # One object array, not nested lists: plotly validates and deep-copies lists element by element.
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
    """confusion_heatmap_figure as a full page that opens offline (plotly.js: see include_plotlyjs)."""
    return fig.to_html(include_plotlyjs=include_plotlyjs(plotlyjs), full_html=True, config=PLOTLY_CONFIG,
                       div_id="confusion-matrix")

