"""The deep dive: why do the classes of the most confused group get confused?

The group is found (or given) first and passed to every later part as a value. Each part returns its own
typed result; `DeepDive` holds them all. Compute lives in compute/, drawing in plots/; this module only
sequences them and writes `gradcam_results/deep_dive/`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd

from helpers.compute import deep_dive, metrics
from helpers.config import Params
from helpers.data.datasets import Dataset, resolve_class_names
from helpers.errors import ConfigError
from helpers.model.cams import CLASS_AGNOSTIC_METHODS
from helpers.model.faithfulness import SoftmaxContrastTarget, faithfulness
from helpers.plots import figures, interactive
from helpers.plots.gallery import render_gallery, render_label_suspects
from helpers.steps.confusion import Confusion
from helpers.steps.context import Run, Section
from helpers.steps.galleries import LARGE_ROAD_PER_PAIR, pair_rows, road_score

SUB = "deep_dive"
N_OCCLUSION = 3
# Large images (run.large_images): 2 images and 6x6 windows, 72 forward passes instead of 192 (20 s of a 200-image
# 224 px ResNet-18 run on 2 cores, more than the inference pass)
N_OCCLUSION_LARGE, OCCLUSION_WINDOWS_LARGE = 2, 6
N_SUSPECTS = 24
MAX_EMBED_POINTS = 3000
FINER_KEY = "finercam (true vs predicted)"   # faithfulness key of the group galleries' FinerCAM score


# ---------------------------------------------------------------------- typed results
@dataclass(kw_only=True)
class Group(Section):
    title: str = "Confused group"
    group: list[int]
    group_names: list[str]
    group_objective: int            # errors among the group's classes, both directions
    group_how: str
    group_counts: np.ndarray
    group_row_pct: np.ndarray


@dataclass(kw_only=True)
class GroupPairs(Section):
    title: str = "Group pair galleries"
    group_pairs: list = None        # per gallery: true, pred, indices, file and the exact maps drawn
    faithfulness: Optional[dict[str, float]] = None
    faithfulness_random: Optional[dict[str, float]] = None


@dataclass(kw_only=True)
class FeatureSpace(Section):
    title: str = "Feature space"
    embedding_method: Optional[str] = None
    separability: Optional[dict] = None


@dataclass(kw_only=True)
class Head(Section):
    title: str = "Classifier head"
    head_cosine: Optional[np.ndarray] = None
    head_cosine_max: Optional[float] = None
    head_cosine_pair: Optional[tuple[str, str]] = None


@dataclass(kw_only=True)
class Occlusion(Section):
    title: str = "Occlusion"
    occlusion_cam_correlation: Optional[list[float]] = None


@dataclass(kw_only=True)
class Superclasses(Section):
    title: str = "Superclasses"
    superclass_share: Optional[dict] = None
    within_pairs: Optional[pd.DataFrame] = None
    coarse_cm: Optional[np.ndarray] = None


@dataclass(kw_only=True)
class Calibration(Section):
    title: str = "Calibration"
    ece: float
    high_conf: dict
    overconfident: pd.DataFrame


@dataclass(kw_only=True)
class LabelSuspects(Section):
    title: str = "Label suspects"
    label_suspects: pd.DataFrame
    n_label_suspects: int
    cleanlab_issues: Optional[int] = None


@dataclass(kw_only=True)
class DeepDive(Section):
    title: str = "Deep dive"
    group: Group
    finer: Optional[GroupPairs] = None
    features: Optional[FeatureSpace] = None
    head: Optional[Head] = None
    occlusion: Optional[Occlusion] = None
    superclasses: Optional[Superclasses] = None
    calibration: Optional[Calibration] = None
    suspects: Optional[LabelSuspects] = None

    @property
    def parts(self) -> list[Section]:
        return [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Section)]

    @property
    def values(self) -> dict[str, Any]:
        """Every part's numbers under their own names (`dd.values["separability"]`)."""
        merged: dict[str, Any] = {}
        for part in self.parts:
            merged.update(part.values)
        return merged


# ---------------------------------------------------------------------- the parts
def given_group(params: Params, data: Dataset) -> Optional[list[int]]:
    """GROUP_CLASSES as class ids, or None when the group is to be found (GROUP_SIZE classes). Checked as soon
    as the data is loaded, before inference: known names, no class twice, a GROUP_SIZE the data can fill."""
    if params.GROUP_CLASSES:
        ids = resolve_class_names(list(params.GROUP_CLASSES), data.class_names, what="GROUP_CLASSES")
        twice = sorted({data.class_names[i] for i in ids if ids.count(i) > 1})
        if twice:
            raise ConfigError(f"GROUP_CLASSES names {', '.join(map(repr, twice))} more than once "
                              f"({list(params.GROUP_CLASSES)!r}); list each class of the group once.")
        return [int(i) for i in ids]
    if params.GROUP_SIZE > data.num_classes:
        raise ConfigError(f"GROUP_SIZE = {params.GROUP_SIZE}, but {data.name} has {data.num_classes} classes: set "
                          f"GROUP_SIZE to at most {data.num_classes}, or name the group with GROUP_CLASSES.")
    return None


def group_step(run: Run, conf: Confusion) -> Group:
    p = run.params
    group = given_group(p, run.data)
    if group is not None:
        objective = metrics.group_objective(conf.cm, group)
        how = "given by GROUP_CLASSES"
    else:
        group, objective = metrics.find_confused_group(conf.cm, k=p.GROUP_SIZE)
        how = "found automatically"
    group = [int(g) for g in group]
    counts, row_pct = metrics.group_confusion(conf.cm, group)
    names = [run.names[g] for g in group]
    table = pd.DataFrame(counts, index=names, columns=names)
    table_pct = pd.DataFrame(np.round(row_pct, 2), index=names, columns=[f"{n} (row %)" for n in names])
    run.outputs.save_csv(pd.concat([table, table_pct], axis=1).reset_index(names="true class"),
                         SUB, "group_confusion.csv")
    sec = Group(group=group, group_names=names, group_objective=int(objective), group_how=how,
                group_counts=counts, group_row_pct=row_pct)
    fig = figures.plot_group_confusion(counts, row_pct, names)
    sec.figures["group_confusion"] = fig
    run.outputs.save_figure(fig, SUB, "group_confusion.png")
    sec.files += [f"{SUB}/group_confusion.png", f"{SUB}/group_confusion.csv"]
    sec.notes.append(f"Confused group ({how}): {', '.join(names)} — {int(objective)} errors among them.")
    return sec


def group_pairs_step(run: Run, conf: Confusion, g: Group) -> GroupPairs:
    """Original | CAM true | CAM predicted | FinerCAM (true vs predicted) for every ordered pair with errors,
    and one faithfulness score per CAM method shown, printed beside the galleries."""
    sec = GroupPairs(group_pairs=[])
    faith_idx, faith_cls, faith_pred, faith_finer = [], [], [], []
    for a, t in enumerate(g.group):
        for b, q in enumerate(g.group):
            if a == b or g.group_counts[a, b] == 0:
                continue
            idx, rows, cam_t, cam_p, finer = pair_rows(run, t, q, run.params.PAIR_EXAMPLES, finer=True)
            if not rows:
                continue
            title = f"{run.names[t]} → {run.names[q]}: {int(g.group_counts[a, b])} errors"
            img = render_gallery(title, [("original · CAM true · CAM predicted · FinerCAM (true vs predicted)", rows)])
            name = f"group_pair_{run.class_slug(t)}_to_{run.class_slug(q)}.png"
            run.outputs.save_figure(img, SUB, name)
            sec.figures[name] = img
            sec.files.append(f"{SUB}/{name}")
            # The exact maps drawn, so callers (and tests) can check them against pytorch-grad-cam.
            sec.group_pairs.append({"true": int(t), "pred": int(q), "indices": list(idx), "file": f"{SUB}/{name}",
                                    "cam_true": cam_t, "cam_pred": cam_p, "finercam": finer})
            take = LARGE_ROAD_PER_PAIR if run.large_images else len(idx)   # 4 ROAD scorings of these images
            faith_idx += idx[:take]
            faith_cls += [t] * len(idx[:take])
            faith_pred.append(cam_p[:take])
            faith_finer.append(finer[:take])
    if not faith_idx:
        sec.notes.append("Group pair galleries: no errors between the group's classes, so nothing to show.")
        return sec
    # The plain CAM is scored on the predicted class, as in the pair galleries: a misclassified image has
    # little true-class probability left to lose, so a true-class score would read ~0 whatever the map.
    # FinerCAM explains "true rather than predicted", so it is scored on p(true) - p(pred). Removing any 20% of
    # a confidently misclassified image lowers p(pred) somewhat, so seeded random maps give the baseline.
    method, seed = run.params.CAM_METHOD, run.params.SEED
    pred = [int(run.preds.preds[i]) for i in faith_idx]
    finer = np.concatenate(faith_finer)
    random_maps = np.random.default_rng(seed).random(finer.shape, dtype=np.float32)
    probs = run.preds.probs[faith_idx]   # from the inference pass: the metric runs only the perturbed images
    before = probs[np.arange(len(faith_idx)), faith_cls] - probs[np.arange(len(faith_idx)), pred]
    contrast = [SoftmaxContrastTarget(t, q) for t, q in zip(faith_cls, pred)]

    def contrast_score(maps: np.ndarray) -> float:
        def compute() -> float:
            with run.model_threads():
                return float(np.nanmean(faithfulness(run.model.module, run.inputs[faith_idx], contrast, maps,
                                                     seed=seed, scores_before=before)))
        return run.cache.cached("contrast_faithfulness", compute, faith_idx, faith_cls, pred, maps, seed)

    sec.faithfulness = {method: road_score(run, faith_idx, pred, np.concatenate(faith_pred)),
                        FINER_KEY: contrast_score(finer)}
    sec.faithfulness_random = {method: road_score(run, faith_idx, pred, random_maps),
                               FINER_KEY: contrast_score(random_maps)}
    scores, baseline = sec.faithfulness, sec.faithfulness_random
    agnostic = (" EigenCAM ignores the class: its true- and predicted-class maps are the same map."
                if method in CLASS_AGNOSTIC_METHODS else "")
    sec.notes.append(
        f"CAM faithfulness beside these galleries (ROAD most-relevant-first, mean over {len(faith_idx)} images): "
        f"{method} {scores[method]:+.4f} (change of p(predicted); random maps {baseline[method]:+.4f}); FinerCAM "
        f"{scores[FINER_KEY]:+.4f} (change of p(true) − p(predicted); random maps {baseline[FINER_KEY]:+.4f}). "
        f"How to read: removing the 20% most highlighted pixels should take away what the map claims, so a score "
        f"well below the random maps' = the map shows evidence the model really uses; at or above it = do not "
        f"trust that map.{agnostic}")
    return sec


def feature_space_step(run: Run, conf: Confusion, g: Group) -> FeatureSpace:
    pr, p, sec = run.preds, run.params, FeatureSpace()
    if pr.features is None:
        sec.notes.append("Feature space: skipped (the model has no linear head whose input could be captured).")
        return sec
    idx = np.flatnonzero(np.isin(pr.labels, g.group))
    if len(idx) > MAX_EMBED_POINTS:
        idx = np.sort(np.random.default_rng(p.SEED).choice(idx, MAX_EMBED_POINTS, replace=False))
    feats, labels, preds = pr.features[idx], pr.labels[idx], pr.preds[idx]
    if len(idx) < 5:
        sec.notes.append("Feature space: skipped (fewer than 5 images in the group).")
        return sec
    # cached: a re-run with the same model, data and inputs reuses these from OUTPUT_DIR/.cache
    coords, method = run.cache.cached("embedding", lambda: deep_dive.project_2d(feats, seed=p.SEED, method=p.EMBEDDING),
                                      feats, p.SEED, p.EMBEDDING)
    sep = run.cache.cached("separability", lambda: deep_dive.separability(feats, labels, seed=p.SEED),
                           feats, labels, p.SEED)
    sep_text = (f"Logistic-regression CV accuracy on the features: {sep['accuracy']:.1%} "
                f"(chance {sep['chance']:.1%}, n={sep['n']})")
    fig = figures.plot_embedding(coords, labels, preds, g.group, g.group_names, method)
    sec.figures["group_embedding"] = fig
    run.outputs.save_figure(fig, SUB, "group_embedding.png")
    thumbs = [interactive.thumbnail_data_uri(run.data.images[i]) for i in idx]
    page = interactive.embedding_html(coords, labels, preds, g.group, run.names, thumbs, method, sep_text,
                                      plotlyjs=run.outputs.ship_plotlyjs(SUB))
    run.outputs.write_text(page, SUB, "group_embedding.html")
    sec.embedding_method, sec.separability = method, sep
    sec.files += [f"{SUB}/group_embedding.png", f"{SUB}/group_embedding.html"]
    sec.notes.append(f"Feature space projected with {method}. {sep_text}.")
    return sec


def head_step(run: Run, conf: Confusion, g: Group) -> Head:
    sec = Head()
    sim = deep_dive.head_cosine_similarity(run.model.module, g.group, num_classes=run.data.num_classes)
    if sim is None:
        sec.notes.append("Classifier head: not a linear layer, so no weight-vector similarity.")
        return sec
    fig = figures.plot_head_cosine(sim, g.group_names)
    sec.figures["head_cosine"] = fig
    run.outputs.save_figure(fig, SUB, "head_cosine_similarity.png")
    value, (r, c) = deep_dive.max_off_diagonal(sim)
    sec.head_cosine, sec.head_cosine_max, sec.head_cosine_pair = sim, float(value), (g.group_names[r], g.group_names[c])
    sec.files.append(f"{SUB}/head_cosine_similarity.png")
    return sec


def occlusion_step(run: Run, conf: Confusion, g: Group) -> Occlusion:
    """Occlusion needs no gradients, so agreement with the CAM is independent evidence."""
    pr, sec = run.preds, Occlusion()
    err = np.flatnonzero(np.isin(pr.labels, g.group) & np.isin(pr.preds, g.group) & ~pr.correct)
    if not len(err):
        sec.notes.append("Occlusion: no errors inside the group.")
        return sec
    large = run.large_images
    idx = err[np.argsort(-pr.confidence[err], kind="stable")][:N_OCCLUSION_LARGE if large else N_OCCLUSION].tolist()
    targets = pr.preds[idx]
    cams = run.cams.get(idx, targets)
    h, w = run.inputs.shape[-2:]
    window = -(-min(int(h), int(w)) // OCCLUSION_WINDOWS_LARGE) if large else None   # ceil: at most 6 per side
    def occlusion() -> np.ndarray:
        with run.model_threads():
            return deep_dive.occlusion_attribution(run.model.module, run.inputs[idx], targets, window=window)
    occ = deep_dive.normalise01(run.cache.cached("occlusion", occlusion, idx, targets, window))
    fig = figures.plot_occlusion([run.data.images[i] for i in idx], run.overlays(idx, cams), occ,
                                 [run.conf_title(i) for i in idx])
    sec.figures["occlusion"] = fig
    run.outputs.save_figure(fig, SUB, "occlusion_vs_cam.png")
    # Agreement (Pearson correlation) between the CAM and the occlusion map, per image.
    sec.occlusion_cam_correlation = [
        float(np.corrcoef(c.ravel(), o.ravel())[0, 1]) if np.std(o) > 0 and np.std(c) > 0 else float("nan")
        for c, o in zip(cams, occ)]
    sec.files.append(f"{SUB}/occlusion_vs_cam.png")
    return sec


def superclass_step(run: Run, conf: Confusion, g: Group) -> Superclasses:
    data, pr, sec = run.data, run.preds, Superclasses()
    f2c = data.fine_to_coarse
    if f2c is None:
        sec.notes.append("Superclasses: skipped — this dataset has no coarse labels "
                         "(set SUPERCLASS_MAP = {class: group} to enable).")
        return sec
    ccm = metrics.coarse_confusion_matrix(pr.labels, pr.preds, f2c, len(data.coarse_names))
    fig = figures.plot_coarse_confusion(ccm, [n.replace("_", " ") for n in data.coarse_names])
    sec.figures["coarse_confusion"] = fig
    run.outputs.save_figure(fig, SUB, "superclass_confusion.png", tight=False)   # fixed margins or constrained
    share = metrics.superclass_error_share(pr.labels, pr.preds, f2c)
    within = metrics.top_within_superclass_pairs(conf.cm, data.class_names, f2c, k=10)
    run.outputs.save_csv(metrics.pairs_for_csv(within), SUB, "within_superclass_pairs.csv")
    sec.superclass_share, sec.within_pairs, sec.coarse_cm = share, within, ccm
    sec.files += [f"{SUB}/superclass_confusion.png", f"{SUB}/within_superclass_pairs.csv"]
    sec.notes.append(f"{share['share']:.1%} of errors stay inside the true superclass (chance {share['chance']:.1%}).")
    return sec


def calibration_step(run: Run, conf: Confusion, g: Group) -> Calibration:
    pr, high_at = run.preds, metrics.HIGH_CONFIDENCE
    ece, bins = metrics.expected_calibration_error(pr.probs, pr.labels, n_bins=15)
    sec = Calibration(ece=float(ece), high_conf=metrics.high_confidence_errors(pr.labels, pr.preds, pr.probs, high_at),
                      overconfident=metrics.overconfident_errors_by_class(pr.labels, pr.preds, pr.probs,
                                                                          run.data.class_names, high_at))
    fig = figures.plot_reliability_diagram(bins, ece)
    sec.figures["reliability"] = fig
    run.outputs.save_figure(fig, SUB, "reliability_diagram.png")
    run.outputs.save_csv(bins, SUB, "reliability_bins.csv")
    run.outputs.save_csv(sec.overconfident, SUB, "overconfident_classes.csv")
    sec.files += [f"{SUB}/reliability_diagram.png", f"{SUB}/reliability_bins.csv", f"{SUB}/overconfident_classes.csv"]
    sec.notes.append(f"Expected calibration error (15 bins): {ece:.3f}; {sec.high_conf['count']} errors "
                     f"({sec.high_conf['share_of_errors']:.1%} of errors) made with confidence ≥ {high_at}.")
    return sec


def label_suspects_step(run: Run, conf: Confusion, g: Group) -> LabelSuspects:
    pr, names = run.preds, run.names
    idx = [int(i) for i in metrics.label_suspects(pr.labels, pr.probs, n=N_SUSPECTS)]
    given = pr.probs[idx, pr.labels[idx]] if idx else np.zeros(0)
    pred = pr.probs[idx, pr.preds[idx]] if idx else np.zeros(0)
    table = pd.DataFrame({
        "image_index": idx, "given_label": [names[pr.labels[i]] for i in idx],
        "predicted": [names[pr.preds[i]] for i in idx], "p_given": np.round(given, 4), "p_predicted": np.round(pred, 4),
    })
    sec = LabelSuspects(label_suspects=table, n_label_suspects=metrics.count_label_suspects(pr.labels, pr.probs))
    fig = render_label_suspects([run.data.images[i] for i in idx], list(table["given_label"]),
                                list(table["predicted"]), given, pred)
    sec.figures["label_suspects"] = fig
    run.outputs.save_figure(fig, SUB, "label_suspects.png")
    run.outputs.save_csv(table, SUB, "label_suspects.csv")
    sec.files += [f"{SUB}/label_suspects.png", f"{SUB}/label_suspects.csv"]
    issues = run.cache.cached("cleanlab", lambda: deep_dive.cleanlab_label_issues(pr.labels, pr.probs))
    if issues is not None:
        sec.cleanlab_issues = int(len(issues))
        sec.notes.append(f"cleanlab flags {len(issues)} test images as likely label issues "
                         "(approximate: the probabilities are in-sample, not cross-validated).")
    sec.notes.append(f"{sec.n_label_suspects} images have p(given label) < {metrics.LABEL_SUSPECT_MAX_P_GIVEN} while "
                     f"the model is ≥ {metrics.HIGH_CONFIDENCE:.0%} sure of another class.")
    return sec


# ---------------------------------------------------------------------- sequencing
PART_FIELD: dict[Callable, str] = {group_pairs_step: "finer", feature_space_step: "features", head_step: "head",
                                   occlusion_step: "occlusion", superclass_step: "superclasses",
                                   calibration_step: "calibration", label_suspects_step: "suspects"}
READING_ORDER = (group_pairs_step, feature_space_step, head_step, occlusion_step, superclass_step,
                 calibration_step, label_suspects_step)
# The figures the worker process takes longest to render (the superclass matrix, then occlusion) are queued
# before the parts that keep this process busy (FinerCAM + ROAD, UMAP), so both run at once.
RUN_ORDER = (superclass_step, occlusion_step, head_step, calibration_step, group_pairs_step, feature_space_step,
             label_suspects_step)


def run_deep_dive(run: Run, conf: Confusion, parts: Optional[Sequence[Callable]] = None) -> DeepDive:
    """The group, then every part (or only `parts`) in RUN_ORDER, with their notes, figures and files gathered
    in reading order."""
    group = group_step(run, conf)
    done = {step: step(run, conf, group) for step in RUN_ORDER if parts is None or step in parts}
    dd = DeepDive(group=group, **{PART_FIELD[step]: sec for step, sec in done.items()})
    for sec in [group] + [done[step] for step in READING_ORDER if step in done]:
        dd.figures.update(sec.figures)
        dd.files += sec.files
        dd.notes += sec.notes
    return dd
