"""The deep-dive step of the analysis: why do these classes get confused?

Compute lives in metrics.py and deep_dive.py, drawing in plots.py; this module only sequences them
and writes `gradcam_results/deep_dive/`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from helpers.files import atomic
from helpers.compute import deep_dive
from helpers.compute import metrics
from helpers.plots import figures as plots
from helpers.steps import report
from helpers.model.cams import CLASS_AGNOSTIC_METHODS
from helpers.data.datasets import resolve_class_names, safe_filename
from helpers.compute.recommendations import count_label_suspects

if TYPE_CHECKING:
    from helpers.pipeline import Analysis, Section

SUB = "deep_dive"
N_OCCLUSION = 3
N_SUSPECTS = 24
MAX_EMBED_POINTS = 3000
FINER_KEY = "finercam (true vs predicted)"   # faithfulness key of the group galleries' FinerCAM score


def run_deep_dive(an: "Analysis") -> "Section":
    """Every step, run in RUN_ORDER, with notes, figures and files gathered in READING_ORDER."""
    from helpers.pipeline import Section
    sec = Section("Deep dive")
    parts = {}
    for step in RUN_ORDER:
        part = Section(sec.title, values=sec.values)   # one shared values dict: later steps read the group
        step(an, part)
        parts[step] = part
    for step in READING_ORDER:
        sec.figures.update(parts[step].figures)
        sec.files += parts[step].files
        sec.notes += parts[step].notes
    return sec


def group_step(an: "Analysis", sec: "Section") -> None:
    p, pr = an.params, an.preds
    cm = an.results["confusion"].values["cm"]
    if p.GROUP_CLASSES:
        group = resolve_class_names(list(p.GROUP_CLASSES), an.data.class_names)
        objective = metrics.group_objective(cm, group)
        how = "given by GROUP_CLASSES"
    else:
        k = min(p.GROUP_SIZE, an.data.num_classes)
        group, objective = metrics.find_confused_group(cm, k=k)
        how = "found automatically"
    group = [int(g) for g in group]
    counts, row_pct = metrics.group_confusion(cm, group)
    names = [an.names[g] for g in group]
    table = pd.DataFrame(counts, index=names, columns=names)
    table_pct = pd.DataFrame(np.round(row_pct, 2), index=names, columns=[f"{n} (row %)" for n in names])
    out = pd.concat([table, table_pct], axis=1).reset_index(names="true class")
    atomic.save_csv(out, an._path(SUB, "group_confusion.csv"))
    fig = plots.plot_group_confusion(counts, row_pct, names)
    sec.figures["group_confusion"] = fig
    an._save_fig(fig, SUB, "group_confusion.png")
    sec.values.update(group=group, group_names=names, group_objective=int(objective), group_how=how,
                      group_counts=counts, group_row_pct=row_pct)
    sec.files += [f"{SUB}/group_confusion.png", f"{SUB}/group_confusion.csv"]
    sec.notes.append(f"Confused group ({how}): {', '.join(names)} — {int(objective)} errors among them.")


def group_pairs_step(an: "Analysis", sec: "Section") -> None:
    """Original | CAM true | CAM predicted | FinerCAM (true vs predicted) for every ordered pair with errors,
    and one faithfulness score per CAM method shown, printed beside the galleries."""
    group, counts = sec.values["group"], sec.values["group_counts"]
    faith_idx, faith_cls, faith_pred, faith_finer, shown = [], [], [], [], []
    for a, t in enumerate(group):
        for b, q in enumerate(group):
            if a == b or counts[a, b] == 0:
                continue
            idx, rows, cam_t, cam_p, finer = an.pair_rows(t, q, an.params.PAIR_EXAMPLES, finer=True)
            if not rows:
                continue
            title = f"{an.names[t]} → {an.names[q]}: {int(counts[a, b])} errors"
            img = plots.render_gallery(title, [("original · CAM true · CAM predicted · FinerCAM (true vs predicted)", rows)])
            name = f"group_pair_{safe_filename(an.data.class_names[t])}_to_{safe_filename(an.data.class_names[q])}.png"
            an._save_fig(img, SUB, name)
            sec.figures[name] = img
            sec.files.append(f"{SUB}/{name}")
            # The exact maps drawn, so callers (and tests) can check them against pytorch-grad-cam.
            shown.append({"true": int(t), "pred": int(q), "indices": list(idx), "file": f"{SUB}/{name}",
                          "cam_true": cam_t, "cam_pred": cam_p, "finercam": finer})
            faith_idx += idx
            faith_cls += [t] * len(idx)
            faith_pred.append(cam_p)
            faith_finer.append(finer)
    sec.values["group_pairs"] = shown
    if not faith_idx:
        sec.notes.append("Group pair galleries: no errors between the group's classes, so nothing to show.")
        return
    # The plain CAM is scored on the predicted class, as in the pair galleries: a misclassified image has
    # little true-class probability left to lose, so a true-class score would read ~0 whatever the map.
    # FinerCAM explains "true rather than predicted", so it is scored on p(true) - p(pred). Removing any 20% of
    # a confidently misclassified image lowers p(pred) somewhat, so seeded random maps give the baseline.
    method, pred = an.params.CAM_METHOD, [int(an.preds.preds[i]) for i in faith_idx]
    finer = np.concatenate(faith_finer)
    random_maps = np.random.default_rng(an.params.SEED).random(finer.shape, dtype=np.float32)

    probs = an.preds.probs[faith_idx]   # from the inference pass: the metric runs only the perturbed images
    before = probs[np.arange(len(faith_idx)), faith_cls] - probs[np.arange(len(faith_idx)), pred]

    def contrast(maps: np.ndarray) -> float:
        return an.cached("contrast_faithfulness", lambda: float(np.nanmean(deep_dive.contrast_faithfulness(
            an.loaded.module, an.inputs[faith_idx], faith_cls, pred, maps, seed=an.params.SEED,
            scores_before=before))), faith_idx, faith_cls, pred, maps, an.params.SEED)

    scores = {method: an._faithfulness(faith_idx, pred, np.concatenate(faith_pred)), FINER_KEY: contrast(finer)}
    baseline = {method: an._faithfulness(faith_idx, pred, random_maps), FINER_KEY: contrast(random_maps)}
    sec.values.update(faithfulness=scores, faithfulness_random=baseline)
    agnostic = (" EigenCAM ignores the class: its true- and predicted-class maps are the same map."
                if method in CLASS_AGNOSTIC_METHODS else "")
    sec.notes.append(
        f"CAM faithfulness beside these galleries (ROAD most-relevant-first, mean over {len(faith_idx)} images): "
        f"{method} {scores[method]:+.4f} (change of p(predicted); random maps {baseline[method]:+.4f}); FinerCAM "
        f"{scores[FINER_KEY]:+.4f} (change of p(true) − p(predicted); random maps {baseline[FINER_KEY]:+.4f}). "
        f"How to read: removing the 20% most highlighted pixels should take away what the map claims, so a score "
        f"well below the random maps' = the map shows evidence the model really uses; at or above it = do not "
        f"trust that map.{agnostic}")


def feature_space_step(an: "Analysis", sec: "Section") -> None:
    pr = an.preds
    if pr.features is None:
        sec.notes.append("Feature space: skipped (the model has no linear head whose input could be captured).")
        return
    group = sec.values["group"]
    mask = np.isin(pr.labels, group)
    idx = np.flatnonzero(mask)
    if len(idx) > MAX_EMBED_POINTS:
        idx = np.sort(np.random.default_rng(an.params.SEED).choice(idx, MAX_EMBED_POINTS, replace=False))
    feats, labels, preds = pr.features[idx], pr.labels[idx], pr.preds[idx]
    if len(idx) < 5:
        sec.notes.append("Feature space: skipped (fewer than 5 images in the group).")
        return
    # an.cached: a re-run with the same model, data and inputs reuses these from OUTPUT_DIR/.cache
    coords, method = an.cached("embedding", lambda: deep_dive.project_2d(feats, seed=an.params.SEED, method=an.params.EMBEDDING),
                               feats, an.params.SEED, an.params.EMBEDDING)
    sep = an.cached("separability", lambda: deep_dive.separability(feats, labels, seed=an.params.SEED),
                    feats, labels, an.params.SEED)
    names = [an.names[g] for g in group]
    sep_text = (f"Logistic-regression CV accuracy on the features: {sep['accuracy']:.1%} "
                f"(chance {sep['chance']:.1%}, n={sep['n']})")
    fig = plots.plot_embedding(coords, labels, preds, group, names, method)
    sec.figures["group_embedding"] = fig
    an._save_fig(fig, SUB, "group_embedding.png")
    thumbs = [plots.thumbnail_data_uri(an.data.images[i]) for i in idx]
    html = plots.embedding_html(coords, labels, preds, group, an.names, thumbs, method, sep_text,
                                plotlyjs=report.ship_plotlyjs(an, SUB))
    atomic.write_text(an._path(SUB, "group_embedding.html"), html)
    sec.values.update(embedding_method=method, separability=sep)
    sec.files += [f"{SUB}/group_embedding.png", f"{SUB}/group_embedding.html"]
    sec.notes.append(f"Feature space projected with {method}. {sep_text}.")


def head_step(an: "Analysis", sec: "Section") -> None:
    group = sec.values["group"]
    sim = deep_dive.head_cosine_similarity(an.loaded.module, group, num_classes=an.data.num_classes)
    if sim is None:
        sec.notes.append("Classifier head: not a linear layer, so no weight-vector similarity.")
        return
    names = sec.values["group_names"]
    fig = plots.plot_head_cosine(sim, names)
    sec.figures["head_cosine"] = fig
    an._save_fig(fig, SUB, "head_cosine_similarity.png")
    value, (r, c) = deep_dive.max_off_diagonal(sim)
    sec.values.update(head_cosine=sim, head_cosine_max=float(value), head_cosine_pair=(names[r], names[c]))
    sec.files.append(f"{SUB}/head_cosine_similarity.png")


def occlusion_step(an: "Analysis", sec: "Section") -> None:
    """Occlusion needs no gradients, so agreement with the CAM is independent evidence."""
    pr, group = an.preds, sec.values["group"]
    err = np.flatnonzero(np.isin(pr.labels, group) & np.isin(pr.preds, group) & ~pr.correct)
    if not len(err):
        sec.notes.append("Occlusion: no errors inside the group.")
        return
    idx = err[np.argsort(-pr.confidence[err], kind="stable")][:N_OCCLUSION].tolist()
    targets = pr.preds[idx]
    cams = an.cams.get(idx, targets)
    occ = deep_dive.normalise01(an.cached("occlusion", lambda: deep_dive.occlusion_attribution(
        an.loaded.module, an.inputs[idx], targets), idx, targets))
    overlays = [an.overlay(i, c) for i, c in zip(idx, cams)]
    titles = [an._conf_title(i) for i in idx]
    fig = plots.plot_occlusion([an.data.images[i] for i in idx], overlays, occ, titles)
    sec.figures["occlusion"] = fig
    an._save_fig(fig, SUB, "occlusion_vs_cam.png")
    # Rank agreement between the CAM and the occlusion map, per image.
    agree = [float(np.corrcoef(c.ravel(), o.ravel())[0, 1]) if np.std(o) > 0 and np.std(c) > 0 else float("nan")
             for c, o in zip(cams, occ)]
    sec.values["occlusion_cam_correlation"] = agree
    sec.files.append(f"{SUB}/occlusion_vs_cam.png")


def superclass_step(an: "Analysis", sec: "Section") -> None:
    data, pr = an.data, an.preds
    f2c = data.fine_to_coarse
    if f2c is None:
        sec.notes.append("Superclasses: skipped — this dataset has no coarse labels "
                         "(set SUPERCLASS_MAP = {class: group} to enable).")
        return
    n_coarse = len(data.coarse_names)
    ccm = metrics.coarse_confusion_matrix(pr.labels, pr.preds, f2c, n_coarse)
    fig = plots.plot_coarse_confusion(ccm, [n.replace("_", " ") for n in data.coarse_names])
    sec.figures["coarse_confusion"] = fig
    an._save_fig(fig, SUB, "superclass_confusion.png", tight=False)   # fixed margins or constrained: both fit
    share = metrics.superclass_error_share(pr.labels, pr.preds, f2c)
    cm = an.results["confusion"].values["cm"]
    within = metrics.top_within_superclass_pairs(cm, data.class_names, f2c, k=10)
    atomic.save_csv(within, an._path(SUB, "within_superclass_pairs.csv"))
    sec.values.update(superclass_share=share, within_pairs=within, coarse_cm=ccm)
    sec.files += [f"{SUB}/superclass_confusion.png", f"{SUB}/within_superclass_pairs.csv"]
    sec.notes.append(f"{share['share']:.1%} of errors stay inside the true superclass "
                     f"(chance {share['chance']:.1%}).")


def calibration_step(an: "Analysis", sec: "Section") -> None:
    pr = an.preds
    ece, bins = metrics.expected_calibration_error(pr.probs, pr.labels, n_bins=15)
    fig = plots.plot_reliability_diagram(bins, ece)
    sec.figures["reliability"] = fig
    an._save_fig(fig, SUB, "reliability_diagram.png")
    atomic.save_csv(bins, an._path(SUB, "reliability_bins.csv"))
    high = metrics.high_confidence_errors(pr.labels, pr.preds, pr.probs, 0.9)
    over = metrics.overconfident_errors_by_class(pr.labels, pr.preds, pr.probs, an.data.class_names, 0.9)
    atomic.save_csv(over, an._path(SUB, "overconfident_classes.csv"))
    sec.values.update(ece=float(ece), high_conf=high, overconfident=over)
    sec.files += [f"{SUB}/reliability_diagram.png", f"{SUB}/reliability_bins.csv", f"{SUB}/overconfident_classes.csv"]
    sec.notes.append(f"Expected calibration error (15 bins): {ece:.3f}; {high['count']} errors "
                     f"({high['share_of_errors']:.1%} of errors) made with confidence ≥ 0.9.")


def label_suspects_step(an: "Analysis", sec: "Section") -> None:
    pr = an.preds
    idx = [int(i) for i in metrics.label_suspects(pr.labels, pr.probs, n=N_SUSPECTS)]
    given = pr.probs[idx, pr.labels[idx]] if idx else np.zeros(0)
    pred = pr.probs[idx, pr.preds[idx]] if idx else np.zeros(0)
    fig = plots.render_label_suspects([an.data.images[i] for i in idx], [an.names[pr.labels[i]] for i in idx],
                                    [an.names[pr.preds[i]] for i in idx], given, pred)
    sec.figures["label_suspects"] = fig
    an._save_fig(fig, SUB, "label_suspects.png")
    table = pd.DataFrame({
        "image_index": idx, "given_label": [an.names[pr.labels[i]] for i in idx],
        "predicted": [an.names[pr.preds[i]] for i in idx], "p_given": np.round(given, 4), "p_predicted": np.round(pred, 4),
    })
    atomic.save_csv(table, an._path(SUB, "label_suspects.csv"))
    n_strong = count_label_suspects(pr.labels, pr.probs)
    sec.values.update(label_suspects=table, n_label_suspects=n_strong)
    sec.files += [f"{SUB}/label_suspects.png", f"{SUB}/label_suspects.csv"]
    issues = an.cached("cleanlab", lambda: deep_dive.cleanlab_label_issues(pr.labels, pr.probs))
    if issues is not None:
        sec.values["cleanlab_issues"] = int(len(issues))
        sec.notes.append(f"cleanlab flags {len(issues)} test images as likely label issues "
                         "(approximate: the probabilities are in-sample, not cross-validated).")
    sec.notes.append(f"{n_strong} images have p(given label) < 0.05 while the model is ≥ 90% sure of another class.")


READING_ORDER = (group_step, group_pairs_step, feature_space_step, head_step, occlusion_step, superclass_step,
                 calibration_step, label_suspects_step)
# The figures the worker process takes longest to render (superclass matrix ~1 s, occlusion ~0.5 s) are queued
# before the steps that keep this process busy for seconds (FinerCAM + ROAD, UMAP), so both run at once; in
# reading order they came last and the report waited ~1.3 s for them (ResNet-56, 2 cores).
RUN_ORDER = (group_step, superclass_step, occlusion_step, head_step, calibration_step, group_pairs_step,
             feature_space_step, label_suspects_step)
