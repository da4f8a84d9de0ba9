"""Where the errors are: the confusion matrix, per-class accuracy and the most confused pairs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pandas as pd

from helpers.compute import metrics, ordering
from helpers.data.datasets import readable
from helpers.plots import figures, interactive
from helpers.steps.context import Run, Section


INLINE_CLASSES = 25   # the inline matrix shows at most this many classes; the saved one shows them all


@dataclass(kw_only=True)
class Confusion(Section):
    title: str = "Confusion"
    cm: np.ndarray
    table: pd.DataFrame             # per-class accuracy (metrics.per_class_table)
    pairs: pd.DataFrame             # the most confused pairs (metrics.most_confused)
    accuracy: float
    high_conf: dict                 # errors made at confidence >= metrics.HIGH_CONFIDENCE
    order: np.ndarray               # rows/columns of the interactive matrix: confusable classes side by side
    order_how: str                  # "superclass" or "clustering"
    row_pct: np.ndarray
    superclass_share: Optional[dict] = None
    per_class_figure: Any = None    # Plotly figures, built once: their own pages and index.html embed them
    heatmap: Any = None
    full_figure: Any = None         # the saved confusion_matrix_full.png; figures["confusion_matrix"] is the inline one


def heatmap_figure(run: Run, cm: np.ndarray, row_pct: np.ndarray, order: np.ndarray, order_how: str):
    """The interactive confusion matrix, superclasses outlined when the data has them."""
    f2c = run.data.fine_to_coarse
    supers = spans = None
    if f2c is not None:
        coarse = run.data.coarse_names or []
        supers = [readable(coarse[c]) if 0 <= c < len(coarse) else "unknown superclass" for c in f2c]
        spans = ordering.block_spans(order, f2c)
    how = "grouped by superclass (outlined)" if order_how == "superclass" else "ordered by a clustering of the confusion"
    title = f"Confusion matrix — accuracy {run.preds.accuracy:.1%}; classes {how}"
    return interactive.confusion_heatmap_figure(cm, row_pct, run.names, order, supers, spans, title)


def confusion(run: Run) -> Confusion:
    p, data, pr, out = run.params, run.data, run.preds, run.outputs
    cm = metrics.confusion_matrix(pr.labels, pr.preds, data.num_classes)
    table = metrics.per_class_table(pr.labels, pr.preds, pr.probs, data.class_names,
                                    data.fine_to_coarse, data.coarse_names)
    pairs = metrics.most_confused(cm, data.class_names, k=p.TOP_PAIRS, fine_to_coarse=data.fine_to_coarse)
    order, order_how = ordering.confusion_order(cm, data.fine_to_coarse)
    row_pct = ordering.row_percent(cm)
    sec = Confusion(
        cm=cm, table=table, pairs=pairs, accuracy=pr.accuracy, order=order, order_how=order_how, row_pct=row_pct,
        high_conf=metrics.high_confidence_errors(pr.labels, pr.preds, pr.probs, metrics.HIGH_CONFIDENCE),
        superclass_share=(metrics.superclass_error_share(pr.labels, pr.preds, data.fine_to_coarse)
                          if data.fine_to_coarse is not None else None),
        per_class_figure=interactive.per_class_accuracy_figure(table),
        heatmap=heatmap_figure(run, cm, row_pct, order, order_how),
    )
    out.save_csv(table, "per_class_accuracy.csv")
    out.save_csv(metrics.pairs_for_csv(pairs), "most_confused_pairs.csv")
    js = out.ship_plotlyjs()
    out.write_text(interactive.per_class_accuracy_html(table, js, fig=sec.per_class_figure),
                   "per_class_accuracy_interactive.html")
    out.write_text(interactive.confusion_heatmap_html(sec.heatmap, js), "confusion_matrix_interactive.html")
    # plot_confusion_matrix writes the accuracy (with its counts) into the title itself
    fig = figures.plot_confusion_matrix(cm, run.names, title="Confusion matrix")
    sec.figures["confusion_matrix"] = sec.full_figure = fig
    out.save_figure(fig, "confusion_matrix_full.png", dpi=80, tight=False)   # constrained, or fixed margins
    if data.num_classes > INLINE_CLASSES:   # 100 tick labels cannot be read at notebook width
        shown = ordering.most_confused_classes(cm, order, INLINE_CLASSES)
        where = (f"Full matrix: {p.OUTPUT_DIR}/confusion_matrix_full.png and "
                 f"{p.OUTPUT_DIR}/confusion_matrix_interactive.html")
        sec.figures["confusion_matrix"] = figures.plot_confusion_subset(
            cm[np.ix_(shown, shown)], [run.names[c] for c in shown], data.num_classes,
            title=f"Confusion matrix (accuracy {pr.accuracy:.1%})", note=where)
        sec.notes.append(f"Shown inline: the {len(shown)} classes with the most errors (as true or predicted class) "
                         f"of {data.num_classes}, in the matrix's {order_how} order. {where}.")
    fig = figures.plot_top_pairs(pairs)
    sec.figures["top_pairs"] = fig
    out.save_figure(fig, "top_confused_pairs.png")
    sec.files = ["confusion_matrix_full.png", "per_class_accuracy.csv", "per_class_accuracy_interactive.html",
                 "confusion_matrix_interactive.html", "most_confused_pairs.csv", "top_confused_pairs.png"]
    return sec
