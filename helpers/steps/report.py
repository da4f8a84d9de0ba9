"""Text and HTML reports: analysis_summary.txt, recommendations.txt, index.html.

Everything here reads numbers the earlier steps measured; nothing is recomputed.
"""
from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING, Optional

import numpy as np

from helpers.files import atomic
from helpers.data.datasets import readable
from helpers.compute.recommendations import Evidence, format_recommendations, recommend

if TYPE_CHECKING:
    from helpers.pipeline import Analysis, Section

MANIFEST = ".manifest.json"

FAITHFULNESS_HOW_TO_READ = (
    "ROAD most-relevant-first: the change in the target-class probability after the 20% most CAM-relevant "
    "pixels are removed (imputed). Lower (more negative) = removing what the CAM highlights hurts the "
    "prediction = the CAM points at evidence the model really uses; near 0 or positive = do not trust the map."
)

# Descriptions for index.html, by file name or prefix.
DESCRIPTIONS = [
    ("confusion_matrix_full.png", "Full confusion matrix: rows are true classes, columns predictions."),
    ("per_class_accuracy.csv", "Accuracy, support, confidence and most frequent wrong prediction per class."),
    ("per_class_accuracy_interactive.html", "Interactive per-class accuracy chart (hover for details)."),
    ("confusion_matrix_interactive.html", "Interactive confusion matrix: hover for counts and row %, "
                                          "toggle counts / row %, confusable classes side by side."),
    ("plotly.min.js", "plotly.js, loaded by every HTML page here, so they open offline."),
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
    ("deep_dive/overconfident_classes.csv", "Classes with the most errors made at confidence ≥ 0.9."),
    ("deep_dive/label_suspects.png", "Test images whose label the model contradicts most confidently."),
    ("deep_dive/label_suspects.csv", "The label suspects as a table."),
]


def describe(rel: str) -> str:
    for key, text in DESCRIPTIONS:
        if rel == key or (key.endswith(("_", "/")) and rel.startswith(key)):
            return text
    return ""


def build_evidence(an: "Analysis") -> Evidence:
    """Gather what the steps measured into the recommendation rules' input."""
    conf = an.results["confusion"].values
    dd = an.results["deep_dive"].values if "deep_dive" in an.results else {}
    pr, pairs, table = an.preds, conf["pairs"], conf["table"]
    share = conf.get("superclass_share")
    sep = dd.get("separability")
    faith = _faithfulness(an)
    high = conf["high_conf"]
    over = dd.get("overconfident")
    suspects = dd.get("label_suspects")
    faith_value = faith.get(an.params.CAM_METHOD) if faith else None
    return Evidence(
        accuracy=float(pr.accuracy),
        n_classes=an.data.num_classes,
        n_images=len(pr.labels),
        n_errors=int((~pr.correct).sum()),
        top_pairs=[(r.true_name, r.pred_name, int(r.count), r.same_superclass, float(r.share_of_true))
                   for r in pairs.itertuples()],
        within_superclass_share=share["share"] if share else None,
        within_superclass_chance=share["chance"] if share else None,
        ece=dd.get("ece"),
        mean_confidence=float(pr.confidence.mean()),
        n_high_conf_errors=int(high["count"]),
        high_conf_error_share=float(high["share_of_errors"]),
        overconfident_classes=[(r.class_name, int(r.count)) for r in over.head(5).itertuples()] if over is not None else None,
        n_label_suspects=dd.get("n_label_suspects"),
        label_suspect_examples=[(r.given_label, r.predicted) for r in suspects.head(5).itertuples()] if suspects is not None else None,
        n_cleanlab_issues=dd.get("cleanlab_issues"),
        group_names=dd.get("group_names"),
        group_objective=dd.get("group_objective"),
        group_separability=sep["accuracy"] if sep else None,
        group_separability_chance=sep["chance"] if sep else None,
        head_cosine_max=dd.get("head_cosine_max"),
        head_cosine_pair=dd.get("head_cosine_pair"),
        worst_classes=[(r.class_name, float(r.accuracy)) for r in table.sort_values("accuracy").head(10).itertuples()],
        class_accuracy_mean=float(table["accuracy"].mean()),
        class_accuracy_std=float(table["accuracy"].std()),
        cam_faithfulness=None if faith_value is None else faithfulness_to_score(faith_value),
        cam_faithfulness_name=f"{an.params.CAM_METHOD} faithfulness (ROAD most-relevant-first, sign flipped)",
    )


def faithfulness_to_score(road: float) -> float:
    """ROAD most-relevant-first is p_after - p_before (negative = faithful); the rules want higher = better."""
    return -float(road)


def _faithfulness(an: "Analysis") -> dict:
    scores = {}
    for key in ("pair_galleries", "deep_dive"):
        if key in an.results:
            for method, value in an.results[key].values.get("faithfulness", {}).items():
                scores.setdefault(method, value)
    return scores


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.1%}"


def summary_text(an: "Analysis", recs) -> str:
    conf = an.results["confusion"].values
    dd = an.results["deep_dive"].values if "deep_dive" in an.results else {}
    pr, data, p = an.preds, an.data, an.params
    table = conf["table"]
    n = len(pr.labels)
    top5 = float(np.mean([lbl in row for lbl, row in zip(pr.labels, np.argsort(-pr.probs, axis=1)[:, :5])])) \
        if data.num_classes > 5 else float("nan")
    lines = [
        "GRAD-CAM CONFUSION ANALYSIS — SUMMARY",
        "=" * 60,
        f"Model:    {an.loaded.arch} — {an.loaded.source}",
        f"Dataset:  {data.name}, {n} test images, {data.num_classes} classes",
        f"CAM:      {p.CAM_METHOD} at layer {an.cams.engine().layer_name}; path: {an.cams.engine().path}",
        "",
        f"Overall accuracy: {pr.accuracy:.2%} ({int(pr.correct.sum())}/{n})",
    ]
    if not np.isnan(top5):
        lines.append(f"Top-5 accuracy:   {top5:.2%}")
    lines += ["", "Best 10 classes:"]
    for r in table.sort_values(["accuracy", "class_id"], ascending=[False, True]).head(10).itertuples():
        lines.append(f"  {r.class_id:3d} {r.class_name:<22} {r.accuracy:6.1%} ({r.correct}/{r.support})")
    lines += ["", "Worst 10 classes:"]
    for r in table.sort_values(["accuracy", "class_id"]).head(10).itertuples():
        wrong = f"; most often → {r.top_wrong_prediction} ({r.top_wrong_count})" if r.top_wrong_count else ""
        lines.append(f"  {r.class_id:3d} {r.class_name:<22} {r.accuracy:6.1%} ({r.correct}/{r.support}){wrong}")
    lines += ["", f"Most confused pairs (true → predicted), top {len(conf['pairs'])}:"]
    for r in conf["pairs"].itertuples():
        same = f"  same superclass: {r.same_superclass}" if r.same_superclass else ""
        lines.append(f"  {r.rank:2d}. {r.true_name} → {r.pred_name}: {r.count} ({r.share_of_true:.1%} of {r.true_name}){same}")
    share = conf.get("superclass_share")
    lines.append("")
    if share:
        lines.append(f"Errors inside the true class's superclass: {share['share']:.1%} "
                     f"({share['n_within']} of {share['n_errors']} errors); chance level {share['chance']:.1%}")
    high = conf["high_conf"]
    lines.append(f"High-confidence errors (confidence ≥ 0.9): {high['count']} "
                 f"({high['share_of_errors']:.1%} of errors, {high['share_of_all']:.1%} of all images)")
    faith = _faithfulness(an)
    if faith:
        lines += ["", "CAM faithfulness (mean ROAD most-relevant-first score on the gallery images):"]
        for method, value in faith.items():
            lines.append(f"  {method}: {value:+.4f}")
        group_scores, random_scores = dd.get("faithfulness", {}), dd.get("faithfulness_random", {})
        if group_scores and random_scores:
            # removing any 20% of a confidently misclassified image moves the scores a little: the baseline
            lines.append("  On the confused group's galleries, against seeded random maps of the same images: " + "; ".join(
                f"{m} {v:+.4f} (random maps {random_scores[m]:+.4f})" for m, v in group_scores.items()
                if m in random_scores))
        lines.append("  How to read: " + FAITHFULNESS_HOW_TO_READ
                     + " A score at or above its random-map baseline says the map is no better than chance.")
    if dd:
        lines += ["", "DEEP DIVE", "-" * 60,
                  f"Confused group ({dd['group_how']}): {', '.join(dd['group_names'])} — "
                  f"{dd['group_objective']} errors among them"]
        names = dd["group_names"]
        for a, t in enumerate(names):
            cells = ", ".join(f"{names[b]} {int(dd['group_counts'][a, b])} ({dd['group_row_pct'][a, b]:.1f}%)"
                              for b in range(len(names)))
            lines.append(f"  {t}: {cells}")
        if "separability" in dd:
            s = dd["separability"]
            lines.append(f"Feature space ({dd['embedding_method']}): logistic-regression CV accuracy "
                         f"{s['accuracy']:.1%} ± {s['std']:.1%} (chance {s['chance']:.1%}, n={s['n']})")
        if "head_cosine_max" in dd:
            lines.append(f"Classifier head: max cosine similarity between the group's weight vectors "
                         f"{dd['head_cosine_max']:.3f}")
        if "occlusion_cam_correlation" in dd:
            vals = ", ".join(f"{v:+.2f}" for v in dd["occlusion_cam_correlation"])
            lines.append(f"Occlusion vs CAM (Pearson r per image, most confident group errors): {vals}")
        if "superclass_share" in dd:
            lines.append("Top within-superclass pairs:")
            for r in dd["within_pairs"].itertuples():
                lines.append(f"  {r.true_name} → {r.pred_name}: {r.count}")
        if "ece" in dd:
            lines.append(f"Expected calibration error (15 bins): {dd['ece']:.4f}")
            over = dd["overconfident"].head(5)
            if len(over):
                lines.append("Classes with the most errors at confidence ≥ 0.9: " +
                             ", ".join(f"{r.class_name} ({r.count})" for r in over.itertuples()))
        if "n_label_suspects" in dd:
            lines.append(f"Label suspects: {dd['n_label_suspects']} images with p(given label) < 0.05 while the "
                         f"model is ≥ 90% sure of another class (Northcutt et al. 2021 found 5.85% of "
                         f"CIFAR-100 test labels wrong).")
        if "cleanlab_issues" in dd:
            lines.append(f"cleanlab find_label_issues: {dd['cleanlab_issues']} images "
                         "(approximate: in-sample test probabilities).")
    lines += ["", f"Recommendations: {len(recs)} (see recommendations.txt)", "",
              "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in an.timings.items()),
              f"Inference cache: {'reused' if an.cache_hit else 'computed'} (key {an.cache_key})"]
    return "\n".join(lines) + "\n"


PLOTLY_JS = "plotly.min.js"


def ship_plotlyjs(an: "Analysis", *subdir: str) -> str:
    """Write plotly.js once per run at the top of the output folder (rewritten only when it changed)
    and return its path relative to a page in `subdir`: every HTML output loads this one copy."""
    from plotly.offline import get_plotlyjs
    path = an.out / PLOTLY_JS
    if path.resolve() not in an.written:
        data = get_plotlyjs().encode("utf-8")
        if not (path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data):
            atomic.write_bytes(path, data)
        an._path(PLOTLY_JS)
    return "../" * len(subdir) + PLOTLY_JS


def confusion_figure(an: "Analysis", values: Optional[dict] = None):
    """The interactive confusion matrix from what the confusion step measured (cm, row_pct, order).
    Built once per run and kept in those values (its own page and index.html both embed it)."""
    from helpers.compute import ordering
    from helpers.plots import figures as plots
    conf = values if values is not None else an.results["confusion"].values
    if "heatmap" in conf:
        return conf["heatmap"]
    f2c = an.data.fine_to_coarse
    supers = spans = None
    if f2c is not None:
        coarse = an.data.coarse_names or []
        supers = [readable(coarse[c]) if 0 <= c < len(coarse) else "unknown superclass" for c in f2c]
        spans = ordering.block_spans(conf["order"], f2c)
    how = ("grouped by superclass (outlined)" if conf["order_how"] == "superclass"
           else "ordered by a clustering of the confusion")
    title = f"Confusion matrix — accuracy {an.preds.accuracy:.1%}; classes {how}"
    conf["heatmap"] = plots.confusion_heatmap_figure(conf["cm"], conf["row_pct"], an.names, conf["order"], supers,
                                                     spans, title)
    return conf["heatmap"]


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
img.wide{max-width:100%;border:1px solid #ccc}iframe{width:100%;height:820px;border:1px solid #ccc}
.note{color:#444}.recs li{margin-bottom:.6em}.recs .ev{color:#555;font-size:.9em}
"""


def _link(rel: str, text: Optional[str] = None) -> str:
    return f'<a href="{html.escape(rel)}">{html.escape(text or rel)}</a>'


def _cards(an: "Analysis") -> str:
    from helpers.pipeline import HIGH_CONFIDENCE
    pr, conf = an.preds, an.results["confusion"].values
    dd = an.results["deep_dive"].values if "deep_dive" in an.results else {}
    n, n_err = len(pr.labels), int((~pr.correct).sum())
    cards = [(f"{pr.accuracy:.2%}", f"accuracy on {n} images, {an.data.num_classes} classes"),
             (f"{n_err}", f"errors ({n_err / max(n, 1):.1%} of the images)")]
    share = conf.get("superclass_share")
    if share:
        cards.append((f"{share['share']:.1%}", f"of errors stay inside the true superclass (chance {share['chance']:.1%})"))
    if "ece" in dd:
        cards.append((f"{dd['ece']:.3f}", "expected calibration error (15 bins)"))
    high = conf["high_conf"]
    cards.append((f"{high['count']}", f"errors at confidence ≥ {HIGH_CONFIDENCE:.1f} ({_pct(high['share_of_errors'])} of errors)"))
    out = [f'<div class="card"><div class="v">{html.escape(v)}</div><div class="l">{html.escape(l)}</div></div>'
           for v, l in cards]
    if an.cams is not None:
        eng = an.cams.engine()
        out.append(f'<div class="card wide"><div class="v">{html.escape(an.params.CAM_METHOD)} at '
                   f'{html.escape(eng.layer_name)}</div><div class="l">CAM path: {html.escape(eng.path)}</div></div>')
    if dd.get("group_names"):
        out.append(f'<div class="card wide"><div class="v">{html.escape(", ".join(dd["group_names"]))}</div>'
                   f'<div class="l">most confused group ({dd["group_objective"]} errors among them)</div></div>')
    return '<div class="cards">' + "".join(out) + "</div>"


def _pairs_table(an: "Analysis", present: set) -> str:
    pairs = an.results["confusion"].values["pairs"]
    galleries = {int(rel.split("_")[2]): rel for rel in present
                 if rel.startswith("confused_pair_") and rel.split("_")[2].isdigit()}
    rows = ["<tr><th>#</th><th>true class</th><th>predicted as</th><th>count</th><th>% of true class</th>"
            "<th>same superclass</th><th>galleries</th></tr>"]
    for r in pairs.itertuples():
        links = []
        if int(r.rank) in galleries:
            links.append(_link(galleries[int(r.rank)], "pair CAMs"))
        cls_gallery = f"worst_predictions/{an.gallery_filename(int(r.true_id))}"
        if cls_gallery in present:
            links.append(_link(cls_gallery, f"{r.true_name} gallery"))
        rows.append(f"<tr><td>{int(r.rank)}</td><td>{html.escape(str(r.true_name))}</td>"
                    f"<td>{html.escape(str(r.pred_name))}</td><td>{int(r.count)}</td><td>{r.share_of_true:.1%}</td>"
                    f"<td>{html.escape(str(r.same_superclass or ''))}</td><td>{' · '.join(links)}</td></tr>")
    return "<table id=\"pairs-table\">" + "".join(rows) + "</table>"


def _figures(rels: list[str]) -> str:
    return '<div class="figs">' + "".join(
        f'<figure><a href="{html.escape(r)}"><img src="{html.escape(r)}" alt="{html.escape(r)}"></a>'
        f"<figcaption>{html.escape(describe(r) or r)}</figcaption></figure>" for r in rels) + "</div>"


def _file_table(rels: list[str]) -> str:
    return "<table>" + "".join(f"<tr><td>{_link(r)}</td><td>{html.escape(describe(r))}</td></tr>" for r in rels) + "</table>"


def index_html(an: "Analysis", files: list[str], recs=None) -> str:
    """The report page: headline numbers, the interactive confusion matrix and per-class chart,
    the confused pairs with their galleries, the deep dive, and every output with a description.
    Loads the plotly.min.js shipped beside it (ship_plotlyjs); no network."""
    from helpers.plots import figures as plots
    conf = an.results["confusion"].values
    present = set(files)
    pair_pngs = [f for f in files if f.startswith("confused_pair_")]
    deep_pngs = [f for f in files if f.startswith("deep_dive/") and f.endswith(".png")]
    how = ("Rows and columns are grouped by superclass (red outlines), with superclasses placed next to those "
           "they are confused with" if conf["order_how"] == "superclass" else
           "Rows and columns are ordered by a hierarchical clustering of the confusion, so classes the model "
           "mixes up sit next to each other")
    sections = [
        ("summary", "Headline numbers", _cards(an)),
        ("confusion", "Confusion matrix",
         f'<p class="note">{how}. Hover a cell for the true and predicted class, the count and the row %. '
         "The buttons switch the colour between counts, row % and row % without the diagonal (errors only). "
         f'Also as {_link("confusion_matrix_interactive.html", "its own page")} and as a '
         f'{_link("confusion_matrix_full.png", "static PNG")}.</p>'
         + plots.plotly_div(confusion_figure(an), "confusion-matrix")),
        ("per-class", "Per-class accuracy",
         plots.plotly_div(conf.get("per_class_figure") or plots.per_class_accuracy_figure(conf["table"]),
                          "per-class-accuracy")
         + f'<p>{_link("per_class_accuracy.csv")} · {_link("per_class_accuracy_interactive.html")}</p>'),
        ("pairs", "Most confused pairs",
         _pairs_table(an, present) + (f'<p><img class="wide" src="top_confused_pairs.png" alt="top confused pairs"></p>'
                                      if "top_confused_pairs.png" in present else "")
         + (_figures(pair_pngs) if pair_pngs else "")),
    ]
    if deep_pngs or "deep_dive/group_embedding.html" in present:
        body = _figures(deep_pngs)
        if "deep_dive/group_embedding.html" in present:
            body += ('<h3>Feature space of the group</h3><p class="note">Hover a point to see the image. '
                     f'{_link("deep_dive/group_embedding.html", "Open on its own page")}.</p>'
                     '<iframe src="deep_dive/group_embedding.html" title="group embedding"></iframe>')
        sections.append(("deep-dive", "Deep dive", body))
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
<html lang="en"><head><meta charset="utf-8"><title>Grad-CAM confusion analysis</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_INDEX_CSS}</style>
<script src="{PLOTLY_JS}"></script></head>
<body><h1>Grad-CAM confusion analysis</h1>
<p>Model: {html.escape(an.loaded.arch)} — {html.escape(an.loaded.source)}. Dataset: {html.escape(an.data.name)}.</p>
<nav>{nav}</nav>
{content}
</body></html>
"""


def write_reports(an: "Analysis") -> "Section":
    from helpers.pipeline import Section
    sec = Section("Summary and recommendations")
    recs = recommend(build_evidence(an))
    atomic.write_text(an._path("recommendations.txt"), format_recommendations(recs))
    atomic.write_text(an._path("analysis_summary.txt"), summary_text(an, recs))
    removed = remove_stale_outputs(an)
    files = sorted(str(p.relative_to(an.out.resolve())) for p in an.written) + ["index.html"]
    atomic.write_text(an._path("index.html"), index_html(an, [f for f in files if f != "index.html"], recs))
    atomic.write_text(an.out / MANIFEST, json.dumps(sorted(files), indent=1))
    sec.values.update(recommendations=recs, removed_stale=removed)
    sec.files = ["analysis_summary.txt", "recommendations.txt", "index.html"]
    sec.notes.append(format_recommendations(recs))
    if removed:
        sec.notes.append(f"Removed {len(removed)} outputs of an earlier run that this run does not produce: "
                         + ", ".join(removed[:10]) + (" ..." if len(removed) > 10 else ""))
    return sec


def remove_stale_outputs(an: "Analysis") -> list[str]:
    """Delete files an earlier run listed in its manifest that this run did not write."""
    atomic.remove_orphan_temps(an.out)
    manifest = an.out / MANIFEST
    try:
        previous = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    root = an.out.resolve()
    current = {str(p.relative_to(root)) for p in an.written} | {"index.html"}
    removed = []
    for rel in previous:
        path = (root / rel).resolve()
        if rel in current or root not in path.parents:
            continue
        if path.is_file():
            path.unlink()
            removed.append(rel)
    return removed
