"""Text and HTML reports: analysis_summary.txt, recommendations.txt, index.html.

Everything here reads numbers the earlier steps measured (their typed results); nothing is recomputed.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from helpers.compute.metrics import HIGH_CONFIDENCE, LABEL_SUSPECT_MAX_P_GIVEN, yes_no
from helpers.compute.recommendations import Evidence, Recommendation, format_recommendations, recommend
from helpers.files.png import preview_data_uri
from helpers.plots.explorer import EXPLORER_CSS, explorer_data, explorer_html
from helpers.plots.interactive import plotly_div
from helpers.steps import attributions, data_causes, diagnosis as diagnosis_step, model_causes
from helpers.steps.cells import CellImages
from helpers.steps.confusion import Confusion
from helpers.steps.context import Run, Section
from helpers.steps.deep_dive import DeepDive
from helpers.steps.galleries import PairGalleries

FAITHFULNESS_HOW_TO_READ = (
    "ROAD most-relevant-first: the change in the target-class probability after the 20% most CAM-relevant "
    "pixels are removed (imputed). Lower (more negative) = removing what the CAM highlights hurts the "
    "prediction = the CAM points at evidence the model really uses; near 0 or positive = do not trust the map."
)

# Descriptions for index.html, by file name or prefix.
DESCRIPTIONS = [
    ("confusion_matrix_full.png", "Full confusion matrix: rows are true classes, columns predictions (above 200 "
                                  "classes: by superclass or cluster, numbered)."),
    ("confusion_matrix_top.png", "The 50 most confused classes, each named (label sets above 200 classes)."),
    ("confusion_matrix_groups.png", "The confusion between superclasses or clusters of the confusion, named "
                                    "(label sets above 200 classes)."),
    ("per_class_accuracy.csv", "Accuracy, support, confidence and most frequent wrong prediction per class."),
    ("per_class_accuracy_interactive.html", "Interactive per-class accuracy chart (hover for details)."),
    ("confusion_matrix_interactive.html", "The full interactive confusion matrix on its own page: hover for counts "
                                          "and row %, toggle counts / row %, confusable classes side by side."),
    ("plotly.min.js", "plotly.js, loaded by the other HTML pages here, so they open offline (index.html holds its own copy)."),
    ("most_confused_pairs.csv", "The most frequent true → predicted confusions."),
    ("top_confused_pairs.png", "Bar chart of the most confused pairs."),
    ("confused_pair_", "Confused-pair gallery: original, CAM for the true class, CAM for the predicted class, difference."),
    ("worst_predictions/", "Per-class gallery: worst and best predictions with CAMs."),
    ("analysis_summary.txt", "Every number of this analysis in plain text."),
    ("recommendations.txt", "What to do next, each item citing the numbers that triggered it."),
    ("deep_dive/group_confusion.png", "Sub-confusion matrix of the most confused group of classes."),
    ("deep_dive/group_confusion.csv", "The group's confusion counts and row percentages."),
    ("deep_dive/group_pair_", "Group pair gallery with FinerCAM: what makes it the true class rather than the predicted one."),
    ("deep_dive/group_embedding.html", "Interactive 2-D map of the group's penultimate features (hover for thumbnails)."),
    ("deep_dive/group_embedding.png", "Static 2-D map of the group's penultimate features."),
    ("deep_dive/head_cosine_similarity.png", "Cosine similarity of the group's classifier weight vectors."),
    ("deep_dive/occlusion_vs_cam.png", "Occlusion sensitivity (gradient-free) next to the CAM for the most confident errors."),
    ("deep_dive/superclass_confusion.png", "Confusion between the 20 superclasses (row %)."),
    ("deep_dive/within_superclass_pairs.csv", "The most confused pairs inside one superclass."),
    ("deep_dive/reliability_diagram.png", "Reliability diagram: confidence against accuracy, with the ECE."),
    ("deep_dive/reliability_bins.csv", "The reliability diagram's bins."),
    ("deep_dive/overconfident_classes.csv", f"Classes with the most errors made at confidence ≥ {HIGH_CONFIDENCE}."),
    ("deep_dive/label_suspects.png", "Test images whose label the model contradicts most confidently."),
    ("deep_dive/label_suspects.csv", "The label suspects as a table."),
    ("deep_dive/label_errors.csv", "Wrong test labels per confused pair and per class: human-validated where people "
                                   "checked them (CIFAR), else an unvalidated estimate; accuracy on corrected labels."),
    ("deep_dive/property_slices.csv", "Which kinds of image go wrong: per pair, image and CAM properties of the errors "
                                      "against the true class's correct images (effect size, corrected p, quartiles)."),
    ("deep_dive/property_slices.png", "The properties that separate each pair's errors from correct images."),
    ("deep_dive/train_neighbours_", "Nearest training images of each pair-gallery error, from the true and the "
                                    "predicted class, and ambiguous training images of the true class."),
    ("deep_dive/near_duplicates.csv", "Test images with a near-duplicate in the training set (feature search, "
                                      "confirmed in pixels)."),
    ("deep_dive/near_duplicates.png", "The near-duplicates side by side: test image and its training copy."),
    ("deep_dive/cam_trust.csv", "Can the pair galleries' CAMs be trusted: class sensitivity, randomisation "
                                "(Adebayo et al.) and ROAD against random and Sobel-edge maps."),
    ("deep_dive/cam_trust.png", "One error's CAM beside the randomised model's and the Sobel map; every check's "
                                "numbers."),
    ("deep_dive/method_comparison.png", "Every fast attribution method (saliency, Input × Gradient, SmoothGrad, "
                                        "Integrated Gradients, GradientShap; attention for ViTs) on the group's "
                                        "most confident errors, for the true and the predicted class."),
    ("deep_dive/method_comparison.csv", "Each attribution method's ROAD score against random maps, and its cost."),
    ("deep_dive/concepts.png", "The confused group's NMF concepts of the target layer, each by its strongest "
                               "image patches."),
    ("deep_dive/concept_margins.csv", "Per pair and image: the logit margin z_B − z_A split over the concepts "
                                      "(exact for GAP→Linear heads)."),
    ("deep_dive/failure_modes.csv", "Failure modes inside each top pair: its errors clustered on features and CAM "
                                    "difference, with each mode's size, confidence, wrong labels and properties."),
    ("deep_dive/failure_modes_", "One row per failure mode of a pair: its mean CAM difference and typical errors."),
    ("deep_dive/diagnosis.csv", "Why each top pair is confused: its candidate causes ranked by the share of its "
                                "errors they account for, with the numbers, the figure and the images named."),
]


def describe(rel: str) -> str:
    for key, text in DESCRIPTIONS:
        if rel == key or (key.endswith(("_", "/")) and rel.startswith(key)):
            return text
    return ""


@dataclass(kw_only=True)
class Report(Section):
    title: str = "Summary and recommendations"
    recommendations: list[Recommendation]
    removed_stale: list[str]


def same_superclass(value) -> Optional[bool]:
    """The pairs table's nullable boolean as a plain value: True, False, or None (no superclasses known)."""
    return None if value is None or pd.isna(value) else bool(value)


def faithfulness_scores(pairs: Optional[PairGalleries], deep: Optional[DeepDive]) -> dict[str, float]:
    """Every CAM faithfulness score measured, by method: the pair galleries' first, then the group's."""
    scores: dict[str, float] = {}
    for sec in (pairs, deep.finer if deep is not None else None):
        for method, value in ((sec.faithfulness or {}) if sec is not None else {}).items():
            scores.setdefault(method, value)
    return scores


def faithfulness_to_score(road: float) -> float:
    """ROAD most-relevant-first is p_after - p_before (negative = faithful); the rules want higher = better."""
    return -float(road)


def build_evidence(run: Run, conf: Confusion, deep: Optional[DeepDive], faith: dict[str, float]) -> Evidence:
    """Gather what the steps measured into the recommendation rules' input."""
    pr, table, share = run.preds, conf.table, conf.superclass_share
    sep = deep.features.separability if deep is not None and deep.features is not None else None
    head = deep.head if deep is not None else None
    cal = deep.calibration if deep is not None else None
    sus = deep.suspects if deep is not None else None
    faith_value = faith.get(run.params.CAM_METHOD)
    return Evidence(
        accuracy=float(pr.accuracy),
        n_classes=run.data.num_classes,
        n_images=len(pr.labels),
        n_errors=int((~pr.correct).sum()),
        top_pairs=[(r.true_name, r.pred_name, int(r.count), same_superclass(r.same_superclass), float(r.share_of_true))
                   for r in conf.pairs.itertuples()],
        within_superclass_share=share["share"] if share else None,
        within_superclass_chance=share["chance"] if share else None,
        ece=cal.ece if cal is not None else None,
        mean_confidence=float(pr.confidence.mean()),
        n_high_conf_errors=int(conf.high_conf["count"]),
        high_conf_error_share=float(conf.high_conf["share_of_errors"]),
        overconfident_classes=([(r.class_name, int(r.count)) for r in cal.overconfident.head(5).itertuples()]
                               if cal is not None else None),
        n_label_suspects=sus.n_label_suspects if sus is not None else None,
        label_suspect_examples=([(r.given_label, r.predicted) for r in sus.label_suspects.head(5).itertuples()]
                                if sus is not None else None),
        n_cleanlab_issues=sus.cleanlab_issues if sus is not None else None,
        group_names=deep.group.group_names if deep is not None else None,
        group_objective=deep.group.group_objective if deep is not None else None,
        group_separability=sep["accuracy"] if sep else None,
        group_separability_chance=sep["chance"] if sep else None,
        head_cosine_max=head.head_cosine_max if head is not None else None,
        head_cosine_pair=head.head_cosine_pair if head is not None else None,
        worst_classes=[(r.class_name, float(r.accuracy)) for r in table.sort_values("accuracy").head(10).itertuples()],
        class_accuracy_mean=float(table["accuracy"].mean()),
        class_accuracy_std=float(table["accuracy"].std()),
        cam_faithfulness=None if faith_value is None else faithfulness_to_score(faith_value),
        cam_faithfulness_name=f"{run.params.CAM_METHOD} faithfulness (ROAD most-relevant-first, sign flipped)",
    )


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.1%}"


def _deep_dive_lines(deep: DeepDive) -> list[str]:
    g = deep.group
    lines = ["", "DEEP DIVE", "-" * 60,
             f"Confused group ({g.group_how}): {', '.join(g.group_names)} — {g.group_objective} errors among them"]
    for a, t in enumerate(g.group_names):
        cells = ", ".join(f"{g.group_names[b]} {int(g.group_counts[a, b])} ({g.group_row_pct[a, b]:.1f}%)"
                          for b in range(len(g.group_names)))
        lines.append(f"  {t}: {cells}")
    if deep.features is not None and deep.features.separability is not None:
        s = deep.features.separability
        lines.append(f"Feature space ({deep.features.embedding_method}): logistic-regression CV accuracy "
                     f"{s['accuracy']:.1%} ± {s['std']:.1%} (chance {s['chance']:.1%}, n={s['n']})")
    if deep.head is not None and deep.head.head_cosine_max is not None:
        lines.append(f"Classifier head: max cosine similarity between the group's weight vectors "
                     f"{deep.head.head_cosine_max:.3f}")
    if deep.occlusion is not None and deep.occlusion.occlusion_cam_correlation is not None:
        vals = ", ".join(f"{v:+.2f}" for v in deep.occlusion.occlusion_cam_correlation)
        lines.append(f"Occlusion vs CAM (Pearson r per image, most confident group errors): {vals}")
    if deep.superclasses is not None and deep.superclasses.superclass_share is not None:
        lines.append("Top within-superclass pairs:")
        for r in deep.superclasses.within_pairs.itertuples():
            lines.append(f"  {r.true_name} → {r.pred_name}: {r.count}")
    if deep.calibration is not None:
        lines.append(f"Expected calibration error (15 bins): {deep.calibration.ece:.4f}")
        over = deep.calibration.overconfident.head(5)
        if len(over):
            lines.append(f"Classes with the most errors at confidence ≥ {HIGH_CONFIDENCE}: " +
                         ", ".join(f"{r.class_name} ({r.count})" for r in over.itertuples()))
    if deep.suspects is not None:
        lines.append(f"Label suspects: {deep.suspects.n_label_suspects} images with p(given label) < "
                     f"{LABEL_SUSPECT_MAX_P_GIVEN} while the model is ≥ {HIGH_CONFIDENCE:.0%} sure of another class "
                     f"(Northcutt et al. 2021 found 5.85% of CIFAR-100 test labels wrong).")
        if deep.suspects.cleanlab_issues is not None:
            lines.append(f"cleanlab find_label_issues: {deep.suspects.cleanlab_issues} images "
                         "(approximate: in-sample test probabilities).")
    return lines


def summary_text(run: Run, conf: Confusion, deep: Optional[DeepDive], faith: dict[str, float],
                 recs: list[Recommendation], timings: dict[str, float],
                 causes: Optional[data_causes.DataCauses] = None,
                 diagnosis: Optional[diagnosis_step.Diagnosis] = None,
                 model: Optional[model_causes.ModelCauses] = None,
                 methods: Optional[attributions.MethodComparison] = None) -> str:
    pr, data, p, table = run.preds, run.data, run.params, conf.table
    n = len(pr.labels)
    top5 = float(np.mean([lbl in row for lbl, row in zip(pr.labels, np.argsort(-pr.probs, axis=1)[:, :5])])) \
        if data.num_classes > 5 else float("nan")
    engine = run.cams.engine()
    lines = [
        "GRAD-CAM CONFUSION ANALYSIS — SUMMARY",
        "=" * 60,
        f"Model:    {run.model.arch} — {run.model.source}",
        f"Dataset:  {data.name}, {n} test images, {data.num_classes} classes",
        *([f"Images:   {data.resize_note}"] if getattr(data, "resize_note", "") else []),
        f"Input:    {data.input_note}" + (", float16 autocast in the inference pass" if run.autocast else ""),
        *([f"Read:     {', '.join(data.source_files)}"] if data.source_files else []),
        f"CAM:      {p.CAM_METHOD} at layer {engine.layer_name}; path: {engine.path}",
        "",
        f"Overall accuracy: {pr.accuracy:.2%} ({int(pr.correct.sum())}/{n})",
    ]
    if not np.isnan(top5):
        lines.append(f"Top-5 accuracy:   {top5:.2%}")
    if diagnosis is not None:
        lines += [""] + diagnosis_step.summary_lines(diagnosis)
    lines += ["", "Best 10 classes:"]
    for r in table.sort_values(["accuracy", "class_id"], ascending=[False, True]).head(10).itertuples():
        lines.append(f"  {r.class_id:3d} {r.class_name:<22} {r.accuracy:6.1%} ({r.correct}/{r.support})")
    lines += ["", "Worst 10 classes:"]
    for r in table.sort_values(["accuracy", "class_id"]).head(10).itertuples():
        wrong = f"; most often → {r.top_wrong_prediction} ({r.top_wrong_count})" if r.top_wrong_count else ""
        lines.append(f"  {r.class_id:3d} {r.class_name:<22} {r.accuracy:6.1%} ({r.correct}/{r.support}){wrong}")
    lines += ["", f"Most confused pairs (true → predicted), top {len(conf.pairs)}:"]
    for r in conf.pairs.itertuples():
        same = yes_no(r.same_superclass)
        same = f"  same superclass: {same}" if same else ""
        lines.append(f"  {r.rank:2d}. {r.true_name} → {r.pred_name}: {r.count} ({r.share_of_true:.1%} of {r.true_name}){same}")
    share = conf.superclass_share
    lines.append("")
    if share:
        lines.append(f"Errors inside the true class's superclass: {share['share']:.1%} "
                     f"({share['n_within']} of {share['n_errors']} errors); chance level {share['chance']:.1%}")
    high = conf.high_conf
    lines.append(f"High-confidence errors (confidence ≥ {HIGH_CONFIDENCE}): {high['count']} "
                 f"({high['share_of_errors']:.1%} of errors, {high['share_of_all']:.1%} of all images)")
    if faith:
        lines += ["", "CAM faithfulness (mean ROAD most-relevant-first score on the gallery images):"]
        for method, value in faith.items():
            lines.append(f"  {method}: {value:+.4f}")
        finer = deep.finer if deep is not None else None
        if finer is not None and finer.faithfulness and finer.faithfulness_random:
            # removing any 20% of a confidently misclassified image moves the scores a little: the baseline
            lines.append("  On the confused group's galleries, against seeded random maps of the same images: " + "; ".join(
                f"{m} {v:+.4f} (random maps {finer.faithfulness_random[m]:+.4f})"
                for m, v in finer.faithfulness.items() if m in finer.faithfulness_random))
        lines.append("  How to read: " + FAITHFULNESS_HOW_TO_READ
                     + " A score at or above its random-map baseline says the map is no better than chance.")
    if deep is not None:
        lines += _deep_dive_lines(deep)
    if methods is not None:
        lines += [""] + attributions.summary_lines(methods)
    if causes is not None:
        lines += data_causes.summary_lines(causes)
    if model is not None:
        lines += model_causes.summary_lines(model)
    lines += ["", f"Recommendations: {len(recs)} (see recommendations.txt)", "",
              "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
              f"Inference cache: {'reused' if run.cache.hit else 'computed'} (key {run.cache.key})"]
    return "\n".join(lines) + "\n"


_INDEX_CSS = """
body{font-family:"DejaVu Sans",Arial,sans-serif;max-width:1240px;margin:0 auto;padding:0 16px 40px;color:#222}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:8px 0;z-index:10}
nav a{margin-right:14px;color:#1f5fa8;text-decoration:none}
h2{margin-top:1.8em;border-bottom:2px solid #1f5fa8;padding-bottom:4px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:10px 12px;background:#fafbfd}
.card .v{font-size:1.6em;font-weight:bold;color:#1f5fa8}.card .l{font-size:.85em;color:#555}
.card.wide{grid-column:span 2}.card.wide .v{font-size:1em}
table{border-collapse:collapse;width:100%}th{text-align:left;background:#f0f3f8}
td,th{border-bottom:1px solid #ddd;padding:4px 8px;vertical-align:top}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:16px}
figure{margin:0}figure img{max-width:100%;border:1px solid #ccc}figcaption{font-size:.85em;color:#444}
img.wide{max-width:100%;border:1px solid #ccc}
.note{color:#444}.recs li{margin-bottom:.6em}.recs .ev{color:#555;font-size:.9em}
.noscript{border:1px solid #e0b000;background:#fff8dc;padding:8px 12px;border-radius:6px}
html.js .static-only{display:none}html.no-js .js-only{display:none}
""" + EXPLORER_CSS

NO_SCRIPTS = ("Scripts are off, so this page shows its static figures only. In JupyterLab, click "
              "<b>Trust HTML</b> in the toolbar above for the interactive confusion matrix and its images.")


def _link(rel: str, text: Optional[str] = None) -> str:
    return f'<a href="{html.escape(rel)}">{html.escape(text or rel)}</a>'


def _cards(run: Run, conf: Confusion, deep: Optional[DeepDive]) -> str:
    pr = run.preds
    n, n_err = len(pr.labels), int((~pr.correct).sum())
    cards = [(f"{pr.accuracy:.2%}", f"accuracy on {n} images, {run.data.num_classes} classes"),
             (f"{n_err}", f"errors ({n_err / max(n, 1):.1%} of the images)")]
    share = conf.superclass_share
    if share:
        cards.append((f"{share['share']:.1%}", f"of errors stay inside the true superclass (chance {share['chance']:.1%})"))
    if deep is not None and deep.calibration is not None:
        cards.append((f"{deep.calibration.ece:.3f}", "expected calibration error (15 bins)"))
    high = conf.high_conf
    cards.append((f"{high['count']}", f"errors at confidence ≥ {HIGH_CONFIDENCE:.1f} ({_pct(high['share_of_errors'])} of errors)"))
    out = [f'<div class="card"><div class="v">{html.escape(v)}</div><div class="l">{html.escape(l)}</div></div>'
           for v, l in cards]
    if run.cams is not None:
        eng = run.cams.engine()
        out.append(f'<div class="card wide"><div class="v">{html.escape(run.params.CAM_METHOD)} at '
                   f'{html.escape(eng.layer_name)}</div><div class="l">CAM path: {html.escape(str(eng.path))}</div></div>')
    if deep is not None and deep.group.group_names:
        g = deep.group
        out.append(f'<div class="card wide"><div class="v">{html.escape(", ".join(g.group_names))}</div>'
                   f'<div class="l">most confused group ({g.group_objective} errors among them)</div></div>')
    return '<div class="cards">' + "".join(out) + "</div>"


def _pairs_table(run: Run, conf: Confusion, present: set) -> str:
    galleries = {int(rel.split("_")[2]): rel for rel in present
                 if rel.startswith("confused_pair_") and rel.split("_")[2].isdigit()}
    rows = ["<tr><th>#</th><th>true class</th><th>predicted as</th><th>count</th><th>% of true class</th>"
            "<th>same superclass</th><th>galleries</th></tr>"]
    for r in conf.pairs.itertuples():
        links = []
        if int(r.rank) in galleries:
            links.append(_link(galleries[int(r.rank)], "pair CAMs"))
        cls_gallery = f"worst_predictions/{run.gallery_filename(int(r.true_id))}"
        if cls_gallery in present:
            links.append(_link(cls_gallery, f"{r.true_name} gallery"))
        rows.append(f'<tr data-true="{int(r.true_id)}" data-pred="{int(r.pred_id)}" title="click: this pair\'s images">'
                    f"<td>{int(r.rank)}</td><td>{html.escape(str(r.true_name))}</td>"
                    f"<td>{html.escape(str(r.pred_name))}</td><td>{int(r.count)}</td><td>{r.share_of_true:.1%}</td>"
                    f"<td>{yes_no(r.same_superclass)}</td><td>{' · '.join(links)}</td></tr>")
    return "<table id=\"pairs-table\">" + "".join(rows) + "</table>"


def _img(uri: str, alt: str, cls: str = "") -> str:
    """An embedded preview, or the link text alone when the picture could not be read (an empty src would
    make the browser load the page itself)."""
    if not uri:
        return html.escape(alt)
    cls_attr = f' class="{cls}"' if cls else ""
    return f'<img{cls_attr} alt="{html.escape(alt)}" src="{uri}">'


def _figures(run: Run, rels: list[str]) -> str:
    return '<div class="figs">' + "".join(
        f'<figure><a href="{html.escape(r)}">{_img(preview_data_uri(run.outputs.current(r)), r)}</a>'
        f"<figcaption>{html.escape(describe(r) or r)}</figcaption></figure>" for r in rels) + "</div>"


def _file_table(rels: list[str]) -> str:
    return "<table>" + "".join(f"<tr><td>{_link(r)}</td><td>{html.escape(describe(r))}</td></tr>" for r in rels) + "</table>"


def _explorer(run: Run, conf: Confusion, cells: CellImages) -> str:
    ex = cells.examples
    table = ex.table()
    if not cells.tiles.sheets:   # no tiles drawn (no CAMs, or turned off): no cell claims images
        table[:, 4] = 0
    payload = explorer_data(conf.cm, run.names, conf.order, table, ex.shown, ex.per_cell, ex.budget, cells.tiles,
                            cells.p_pred, cells.p_true, conf.groups, conf.group_names, conf.group_kind)
    return explorer_html(payload, cells.tiles.sheets)


def index_html(run: Run, conf: Confusion, deep: Optional[DeepDive], files: list[str],
               recs: Optional[list[Recommendation]] = None, cells: Optional[CellImages] = None,
               causes: Optional[data_causes.DataCauses] = None,
               diagnosis: Optional[diagnosis_step.Diagnosis] = None,
               model: Optional[model_causes.ModelCauses] = None,
               methods: Optional[attributions.MethodComparison] = None) -> str:
    """The report page, self-contained: plotly.js, the numbers, the confusion cells' images and previews of
    the figures are inside it, so it renders wherever it is opened (from disk, in JupyterLab's sandboxed HTML
    viewer, in a browser tab Jupyter serves); links lead to the full-size files beside it."""
    from plotly.offline import get_plotlyjs

    present = set(files)
    pair_pngs = [f for f in files if f.startswith("confused_pair_")]
    deep_pngs = [f for f in files if f.startswith("deep_dive/") and f.endswith(".png")]
    how = ("Rows and columns are grouped by superclass, with superclasses placed next to those "
           "they are confused with" if conf.order_how == "superclass" else
           "Rows and columns are ordered by a hierarchical clustering of the confusion, so classes the model "
           "mixes up sit next to each other")
    static_cm = ""
    if "confusion_matrix_full.png" in present:
        static_cm = ('<p class="static-only"><a href="confusion_matrix_full.png">'
                     f'{_img(preview_data_uri(run.outputs.current("confusion_matrix_full.png"), 1200), "confusion matrix", "wide")}'
                     '</a></p>')
    explorer = _explorer(run, conf, cells) if cells is not None else ""
    sections = [("why", "Why these classes are confused", diagnosis_step.index_section(run, diagnosis))] \
        if diagnosis is not None else []
    sections += [
        ("summary", "Headline numbers", _cards(run, conf, deep)),
        ("confusion", "Confusion matrix",
         f'<p class="note">{how}. Hover a cell for the true and predicted class, the count and the row %; '
         "<b>click a cell</b> to see its images. Choose which classes to show (the most confused, "
         "collapsed into groups, or one class and its partners by name) and the colour: counts, row % or row % "
         f'without the diagonal. The full matrix: {_link("confusion_matrix_interactive.html", "its own page")} and a '
         f'{_link("confusion_matrix_full.png", "static PNG")}'
         + (f' (by group), with {_link("confusion_matrix_groups.png", "the groups named")}, '
            f'{_link("confusion_matrix_top.png", "the most confused classes named")} and every number in '
            f'{_link("per_class_accuracy.csv")}' if "confusion_matrix_groups.png" in present else "")
         + ".</p>" + static_cm + explorer),
        ("per-class", "Per-class accuracy",
         '<div class="js-only">' + plotly_div(conf.per_class_figure, "per-class-accuracy") + "</div>"
         + f'<p>{_link("per_class_accuracy.csv")} · {_link("per_class_accuracy_interactive.html")}</p>'),
        ("pairs", "Most confused pairs",
         '<p class="note js-only">Click a row to see its images above.</p>'
         + _pairs_table(run, conf, present)
         + ('<p><a href="top_confused_pairs.png">'
            f'{_img(preview_data_uri(run.outputs.current("top_confused_pairs.png")), "top confused pairs", "wide")}</a></p>'
            if "top_confused_pairs.png" in present else "")
         + (_figures(run, pair_pngs) if pair_pngs else "")),
    ]
    if deep_pngs or "deep_dive/group_embedding.html" in present:
        body = _figures(run, deep_pngs)
        if "deep_dive/group_embedding.html" in present:
            body += ('<p class="note">The feature space of the group, interactive with a thumbnail of each point: '
                     f'{_link("deep_dive/group_embedding.html", "its own page")}.</p>')
        sections.append(("deep-dive", "Deep dive", body))
    if methods is not None:
        sections.append(("methods", "Attribution methods", attributions.index_section(run, methods)))
    if causes is not None:
        sections.append(("data", "Is it the data?", data_causes.index_section(run, causes)))
    if model is not None:
        sections.append(("model", "Is it the model?", model_causes.index_section(run, model)))
    if recs is not None:
        items = "".join(f'<li><b>[{html.escape(r.rule)}]</b> {html.escape(r.text)}'
                        f'<div class="ev">Evidence: {html.escape(r.evidence)}</div></li>' for r in recs)
        sections.append(("recommendations", "Recommendations",
                         f'<ol class="recs">{items}</ol>' if recs else "<p>No measured value crossed a threshold.</p>"))
    per_class = [f for f in files if f.startswith("worst_predictions/")]
    others = [f for f in files if f not in per_class]
    listing = _file_table(others)
    if per_class:
        listing += (f"<details><summary>{len(per_class)} per-class galleries (worst_predictions/): "
                    f"{html.escape(describe(per_class[0]))}</summary>{_file_table(per_class)}</details>")
    sections.append(("files", "Every output", listing))
    nav = "".join(f'<a href="#{sid}">{html.escape(title)}</a>' for sid, title, _ in sections)
    content = "".join(f'<section id="{sid}"><h2>{html.escape(title)}</h2>{body}</section>' for sid, title, body in sections)
    return f"""<!DOCTYPE html>
<html lang="en" class="no-js"><head><meta charset="utf-8"><title>Grad-CAM confusion analysis</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<script>document.documentElement.className = "js";</script>
<style>{_INDEX_CSS}</style>
<script>{get_plotlyjs()}</script></head>
<body><h1>Grad-CAM confusion analysis</h1>
<p class="noscript static-only">{NO_SCRIPTS}</p>
<p>Model: {html.escape(run.model.arch)} — {html.escape(run.model.source)}. Dataset: {html.escape(run.data.name)}.</p>
<nav>{nav}</nav>
{content}
</body></html>
"""


def write_reports(run: Run, conf: Confusion, pairs: Optional[PairGalleries], deep: Optional[DeepDive],
                  timings: dict[str, float], cells: Optional[CellImages] = None,
                  causes: Optional[data_causes.DataCauses] = None,
                  diagnosis: Optional[diagnosis_step.Diagnosis] = None,
                  model: Optional[model_causes.ModelCauses] = None,
                  methods: Optional[attributions.MethodComparison] = None) -> Report:
    """recommendations.txt, analysis_summary.txt, then (with every other output on disk) the stale-output
    clean-up, index.html and the manifest."""
    out = run.outputs
    faith = faithfulness_scores(pairs, deep)
    recs = recommend(build_evidence(run, conf, deep, faith),
                     diagnosis=diagnosis.pairs if diagnosis is not None else None)
    out.write_text(format_recommendations(recs), "recommendations.txt")
    out.write_text(summary_text(run, conf, deep, faith, recs, timings, causes, diagnosis, model, methods),
                   "analysis_summary.txt")
    files = out.files()
    out.write_text(index_html(run, conf, deep, files, recs, cells, causes, diagnosis, model, methods), "index.html")
    removed = out.commit()   # the run's outputs move into place; the earlier run's others go
    sec = Report(recommendations=recs, removed_stale=removed,
                 files=["analysis_summary.txt", "recommendations.txt", "index.html"])
    sec.notes.append(format_recommendations(recs))
    sec.notes += out.warnings   # what the clean-up left alone (a malformed manifest, names it does not write)
    if removed:
        sec.notes.append(f"Removed {len(removed)} outputs of an earlier run that this run does not produce: "
                         + ", ".join(removed[:10]) + (" ..." if len(removed) > 10 else ""))
    return sec
