"""Where the errors are: the confusion matrix, per-class accuracy and the most confused pairs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pandas as pd

from helpers.compute import metrics, ordering
from helpers.data.datasets import readable
from helpers.plots import explorer, figures, interactive
from helpers.plots.cell_tiles import tile_sheets
from helpers.steps.context import Run, Section


INLINE_CLASSES = 25   # the inline matrix shows at most this many classes; the saved one shows them all
# Up to this many classes the saved full matrix names every class (7-pt names on a 26-in side); above, the names
# would overlap, so it is drawn by groups, with confusion_matrix_top.png (the TOP_CLASSES most confused classes,
# named) and confusion_matrix_groups.png (the groups' own matrix, named) beside it.
LABELLED_MAX = 200
TOP_CLASSES = 50
GROUPED_MIN = 12      # from this many classes on, datasets without superclasses get clusters of their confusion


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
    groups: Optional[np.ndarray] = None     # a group id per class (superclass or cluster of the confusion), or None
    group_names: Optional[list] = None      # the groups' names, by id
    group_kind: str = "superclass"          # "superclass" or "cluster"
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


def weakest_classes(cm: np.ndarray) -> np.ndarray:
    """Every class, weakest first: by accuracy (ascending), then by errors (descending), then id; classes without
    test images last."""
    cm = np.asarray(cm)
    support = cm.sum(axis=1)
    correct = np.diag(cm)
    accuracy = np.where(support > 0, correct / np.maximum(support, 1), np.inf)
    return np.lexsort((np.arange(len(cm)), -(support - correct), accuracy))


def class_groups(run: Run, cm: np.ndarray, order: np.ndarray) -> tuple[Optional[np.ndarray], Optional[list], str]:
    """(group id per class, group names, kind) for the collapsed views: the superclasses when the data has them
    (classes of an unknown superclass form one more group), else, from GROUPED_MIN classes on, about sqrt(n)
    clusters of the confusion (compute.ordering.cluster_groups), named by their first classes along `order`."""
    data = run.data
    if data.fine_to_coarse is not None and data.coarse_names:
        f2c = np.asarray(data.fine_to_coarse)
        return (np.where(f2c >= 0, f2c, len(data.coarse_names)),
                [readable(c) for c in data.coarse_names] + ["unknown superclass"], "superclass")
    if data.num_classes <= GROUPED_MIN:
        return None, None, "cluster"
    groups = ordering.cluster_groups(cm, max(2, round(data.num_classes ** 0.5)), order)
    names = [f"cluster {g + 1}: " + ", ".join(run.names[c] for c in order if groups[c] == g)
             for g in range(int(groups.max()) + 1)]
    return groups, [n if len(n) <= 60 else n[:59] + "…" for n in names], "cluster"


def grouped_views(run: Run, sec: Confusion) -> tuple[list[str], Any]:
    """For more than LABELLED_MAX classes: the full matrix drawn by groups, the TOP_CLASSES most confused classes
    named, and the groups' own matrix; the interactive page becomes the explorer (top N, groups, search), since
    a heatmap of every cell would be tens of MB. Returns the files written and the groups' figure."""
    cm, out, n = sec.cm, run.outputs, len(sec.cm)
    # the runs of one group along the order; cluster ids renumbered along it, so that the numbers read 1, 2, ...
    seen: dict[int, int] = {}
    for cls in sec.order:
        seen.setdefault(int(sec.groups[cls]), len(seen))
    along = np.array([seen[int(g)] for g in sec.groups], dtype=np.int64)
    spans = ordering.block_spans(sec.order, along)
    present = sorted(seen, key=seen.get)
    names = [sec.group_names[g] for g in present]
    numbered = [f"{k + 1}. {name.split(': ', 1)[-1] if sec.group_kind == 'cluster' else name}"
                for k, name in enumerate(names)]
    where = "names: confusion_matrix_groups.png; named classes: confusion_matrix_top.png"
    out.save_figure(figures.plot_confusion_overview(cm, sec.order, spans, sec.group_kind, note=where),
                    "confusion_matrix_full.png", dpi=80, tight=False)
    top = ordering.most_confused_classes(cm, sec.order, TOP_CLASSES)
    fig = figures.plot_confusion_subset(cm[np.ix_(top, top)], [run.names[c] for c in top], n,
                                        title=f"Confusion matrix (accuracy {run.preds.accuracy:.1%})",
                                        note="classes in the full matrix's order")
    out.save_figure(fig, "confusion_matrix_top.png")
    group_cm = ordering.coarse_matrix(cm, along)
    group_fig = figures.plot_coarse_confusion(group_cm, numbered, what=sec.group_kind)
    out.save_figure(group_fig, "confusion_matrix_groups.png", tight=False if len(numbered) > 12 else None)  # fixed margins
    data = explorer.explorer_data(cm, run.names, sec.order, explorer.cells_table(cm), np.zeros(0, np.int64), 0, 0,
                                  tile_sheets([], [], []), np.zeros(0), np.zeros(0), sec.groups, sec.group_names,
                                  sec.group_kind, images_note="index.html shows the images behind the cells.")
    out.write_text(explorer.explorer_page(data, f"Confusion matrix of {n} classes — accuracy "
                                                f"{run.preds.accuracy:.1%}", out.ship_plotlyjs()),
                   "confusion_matrix_interactive.html")
    sec.notes.append(f"{n} classes: confusion_matrix_full.png shows the whole matrix by {sec.group_kind} "
                     f"({len(spans)}, numbered), confusion_matrix_groups.png their confusion with names, "
                     f"confusion_matrix_top.png the {len(top)} most confused classes by name; the full table is "
                     "in per_class_accuracy.csv and the explorer (confusion_matrix_interactive.html, index.html) "
                     "shows any class by name.")
    return ["confusion_matrix_top.png", "confusion_matrix_groups.png"], group_fig


def confusion(run: Run) -> Confusion:
    p, data, pr, out = run.params, run.data, run.preds, run.outputs
    cm = metrics.confusion_matrix(pr.labels, pr.preds, data.num_classes)
    table = metrics.per_class_table(pr.labels, pr.preds, pr.probs, data.class_names,
                                    data.fine_to_coarse, data.coarse_names)
    pairs = metrics.most_confused(cm, data.class_names, k=p.TOP_PAIRS, fine_to_coarse=data.fine_to_coarse)
    order, order_how = ordering.confusion_order(cm, data.fine_to_coarse)
    row_pct = ordering.row_percent(cm)
    groups, group_names, group_kind = class_groups(run, cm, order)
    many = data.num_classes > LABELLED_MAX
    sec = Confusion(
        groups=groups, group_names=group_names, group_kind=group_kind,
        cm=cm, table=table, pairs=pairs, accuracy=pr.accuracy, order=order, order_how=order_how, row_pct=row_pct,
        high_conf=metrics.high_confidence_errors(pr.labels, pr.preds, pr.probs, metrics.HIGH_CONFIDENCE),
        superclass_share=(metrics.superclass_error_share(pr.labels, pr.preds, data.fine_to_coarse)
                          if data.fine_to_coarse is not None else None),
        per_class_figure=interactive.per_class_accuracy_figure(table),
        heatmap=None if many else heatmap_figure(run, cm, row_pct, order, order_how),
    )
    out.save_csv(table, "per_class_accuracy.csv")
    out.save_csv(metrics.pairs_for_csv(pairs), "most_confused_pairs.csv")
    js = out.ship_plotlyjs()
    out.write_text(interactive.per_class_accuracy_html(table, js, fig=sec.per_class_figure),
                   "per_class_accuracy_interactive.html")
    extra, group_fig = [], None
    if many:
        extra, group_fig = grouped_views(run, sec)
    else:
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
    if group_fig is not None:
        sec.figures["confusion_groups"] = group_fig
    fig = figures.plot_top_pairs(pairs)
    sec.figures["top_pairs"] = fig
    out.save_figure(fig, "top_confused_pairs.png")
    sec.files = ["confusion_matrix_full.png", *extra, "per_class_accuracy.csv", "per_class_accuracy_interactive.html",
                 "confusion_matrix_interactive.html", "most_confused_pairs.csv", "top_confused_pairs.png"]
    return sec
