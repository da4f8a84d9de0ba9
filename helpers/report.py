"""Text and HTML reports: analysis_summary.txt, recommendations.txt, index.html.

Everything here reads numbers the earlier steps measured; nothing is recomputed.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import atomic_io
from .recommendations import Evidence, format_recommendations, recommend

if TYPE_CHECKING:
    from .pipeline import Analysis, Section

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
        lines.append("  How to read: " + FAITHFULNESS_HOW_TO_READ)
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


def index_html(an: "Analysis", files: list[str]) -> str:
    pr = an.preds
    conf = an.results["confusion"].values
    head = [f"<li><b>Accuracy</b>: {pr.accuracy:.2%} on {len(pr.labels)} images, {an.data.num_classes} classes</li>"]
    share = conf.get("superclass_share")
    if share:
        head.append(f"<li><b>Errors within the superclass</b>: {share['share']:.1%} (chance {share['chance']:.1%})</li>")
    head.append(f"<li><b>High-confidence errors</b> (≥ 0.9): {conf['high_conf']['count']}</li>")
    if "deep_dive" in an.results:
        dd = an.results["deep_dive"].values
        head.append(f"<li><b>Most confused group</b>: {html.escape(', '.join(dd['group_names']))}</li>")
        if "ece" in dd:
            head.append(f"<li><b>Expected calibration error</b>: {dd['ece']:.3f}</li>")
    rows = []
    for rel in files:
        rows.append(f"<tr><td><a href=\"{html.escape(rel)}\">{html.escape(rel)}</a></td>"
                    f"<td>{html.escape(describe(rel))}</td></tr>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Grad-CAM confusion analysis</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;width:100%}}td{{border-bottom:1px solid #ddd;padding:4px 8px;vertical-align:top}}
img.preview{{max-width:100%;border:1px solid #ccc}}</style></head>
<body><h1>Grad-CAM confusion analysis</h1>
<p>Model: {html.escape(an.loaded.arch)} — {html.escape(an.loaded.source)}. Dataset: {html.escape(an.data.name)}.</p>
<ul>{''.join(head)}</ul>
<h2>Most confused pairs</h2><p><img class="preview" src="top_confused_pairs.png" alt="top confused pairs"></p>
<h2>Every output</h2><table>{''.join(rows)}</table>
</body></html>
"""


def write_reports(an: "Analysis") -> "Section":
    from .pipeline import Section
    sec = Section("Summary and recommendations")
    recs = recommend(build_evidence(an))
    atomic_io.write_text(an._path("recommendations.txt"), format_recommendations(recs))
    atomic_io.write_text(an._path("analysis_summary.txt"), summary_text(an, recs))
    removed = remove_stale_outputs(an)
    files = sorted(str(p.relative_to(an.out.resolve())) for p in an.written) + ["index.html"]
    atomic_io.write_text(an._path("index.html"), index_html(an, [f for f in files if f != "index.html"]))
    atomic_io.write_text(an.out / MANIFEST, json.dumps(sorted(files), indent=1))
    sec.values.update(recommendations=recs, removed_stale=removed)
    sec.files = ["analysis_summary.txt", "recommendations.txt", "index.html"]
    sec.notes.append(format_recommendations(recs))
    if removed:
        sec.notes.append(f"Removed {len(removed)} outputs of an earlier run that this run does not produce: "
                         + ", ".join(removed[:10]) + (" ..." if len(removed) > 10 else ""))
    return sec


def remove_stale_outputs(an: "Analysis") -> list[str]:
    """Delete files an earlier run listed in its manifest that this run did not write."""
    atomic_io.remove_orphan_temps(an.out)
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
