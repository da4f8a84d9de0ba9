"""Per-class galleries (worst and best predictions with their CAMs) and confused-pair galleries (true- next to
predicted-class CAMs), with the faithfulness score of the CAMs shown."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from helpers.compute import metrics
from helpers.config import class_gallery_count
from helpers.files import png
from helpers.files.cache import digest
from helpers.model.faithfulness import faithfulness
from helpers.plots import gallery, overlay
from helpers.plots.gallery import GalleryRow, difference_panel, render_gallery
from helpers.steps.confusion import Confusion, weakest_classes
from helpers.steps.context import Run, Section

# What a kept gallery file depends on besides its content: the drawing code and the PNG level.
_DRAWING_CODE = hashlib.sha1(b"".join(Path(m.__file__).read_bytes() for m in (gallery, overlay))
                             + str(png.PNG_COMPRESS_LEVEL).encode()).hexdigest()


@dataclass(kw_only=True)
class ClassGalleries(Section):
    title: str = "Per-class galleries"
    cam_path: object = None        # the CamPath of the engine that computed them
    n_from_activations: int = 0    # CAMs computed from activations kept in the inference pass


@dataclass(kw_only=True)
class PairGalleries(Section):
    title: str = "Confused pairs"
    faithfulness: Optional[dict[str, float]] = None   # CAM_METHOD -> mean ROAD score on the images shown
    n_faithfulness_images: int = 0                     # how many of them (large images: the first of each pair)


# Large images (run.large_images): ROAD on the first 2 images of each pair gallery. It runs the model on 3 imputed
# copies per image: 8.4 s for 30 images of a 2,000-image 224 px ResNet-18 run whose inference pass took 77 s.
LARGE_ROAD_PER_PAIR = 2


# ---------------------------------------------------------------------- rows
def class_rows(run: Run, cls: int, n_worst: int, n_best: int, method: Optional[str] = None,
               layer: Optional[str] = None) -> tuple[list[GalleryRow], list[GalleryRow]]:
    """Gallery rows (worst first, then best) for one class; CAMs come from the store."""
    pr, names = run.preds, run.names
    worst, best = metrics.gallery_examples(pr.labels, pr.preds, pr.probs, cls, n_worst, n_best)
    need = _class_cams_needed(pr, cls, worst, best)
    images = [i for i, _ in need]
    shown = dict(zip(need, run.overlays(images, run.cams.get(images, [c for _, c in need], method=method,
                                                             layer=layer))))

    def row(i: int) -> GalleryRow:
        q = int(pr.preds[i])
        panels = [(f"CAM → pred: {names[q]}", shown[(i, q)])]
        if q != cls:
            panels.append((f"CAM → true: {names[cls]}", shown[(i, cls)]))
        return GalleryRow(image=run.data.images[i], title=run.conf_title(i), panels=panels, ok=q == cls)

    return [row(i) for i in worst], [row(i) for i in best]


def _class_cams_needed(pr, cls: int, worst: Sequence[int], best: Sequence[int]) -> list[tuple[int, int]]:
    """(image, class) of every CAM a class gallery shows: the predicted class, and the true one for errors."""
    return [(int(i), int(pr.preds[i])) for i in list(worst) + list(best)] + \
        [(int(i), cls) for i in worst if pr.preds[i] != cls]


def class_gallery_content(run: Run, cls: int, n_worst: Optional[int] = None, n_best: Optional[int] = None,
                          **kw) -> tuple[str, list]:
    """(title, sections) that plots.gallery.render_gallery draws for one class."""
    p, pr = run.params, run.preds
    n_worst = p.N_WORST if n_worst is None else n_worst
    n_best = p.N_BEST if n_best is None else n_best
    worst, best = class_rows(run, cls, n_worst, n_best, **kw)
    mine = pr.labels == cls
    acc = float((pr.preds[mine] == cls).mean()) if mine.any() else float("nan")
    sections = [(f"{len(worst)} worst predictions", worst), (f"{len(best)} best predictions", best)]
    return f"Class {cls:03d}: {run.names[cls]} — accuracy {acc:.1%}", [s for s in sections if s[1]]


def pair_rows(run: Run, true_cls: int, pred_cls: int, n: int, method: Optional[str] = None,
              layer: Optional[str] = None, finer: bool = False):
    """Rows for a confused pair: original, CAM for the true class, CAM for the predicted class, and either their
    difference or (finer=True) FinerCAM's true-versus-predicted map. Returns (indices, rows, cam_true,
    cam_pred, finercam or None)."""
    pr, names = run.preds, run.names
    idx = [int(i) for i in metrics.pair_examples(pr.labels, pr.preds, pr.probs, true_cls, pred_cls, n)]
    cam_t = run.cams.get(idx, [true_cls] * len(idx), method=method, layer=layer)
    cam_p = run.cams.get(idx, [pred_cls] * len(idx), method=method, layer=layer)
    extra = None
    if finer and idx:
        engine = run.cams.engine(method, layer)
        extra = run.cache.cached(
            "finercam", lambda: engine.compute_finer(run.inputs[idx], np.full(len(idx), true_cls),
                                                     np.full(len(idx), pred_cls)),
            engine.method, engine.layer_name, idx, true_cls, pred_cls)
    over_t, over_p = run.overlays(idx, cam_t), run.overlays(idx, cam_p)
    over_x = run.overlays(idx, extra) if extra is not None else None
    rows = []
    for k, i in enumerate(idx):
        panels = [(f"CAM → true: {names[true_cls]}", over_t[k]), (f"CAM → pred: {names[pred_cls]}", over_p[k])]
        if extra is not None:
            panels.append((f"FinerCAM: {names[true_cls]} vs {names[pred_cls]}", over_x[k]))
        else:
            panels.append(("difference (true − pred)", difference_panel(cam_t[k], cam_p[k])))
        rows.append(GalleryRow(image=run.data.images[i], title=run.conf_title(i), panels=panels, ok=False))
    return idx, rows, cam_t, cam_p, extra


def road_score(run: Run, idx: Sequence[int], classes: Sequence[int], maps: np.ndarray) -> float:
    """Mean ROAD most-relevant-first score of `maps` for p(class) (cached). p(class) of the originals is known
    from the inference pass, so only the perturbed images are run."""
    idx, classes = list(idx), list(classes)

    def compute() -> float:
        before = run.preds.probs[np.asarray(idx, dtype=np.int64), np.asarray(classes, dtype=np.int64)]
        with run.model_threads():
            scores = faithfulness(run.model.module, run.inputs[idx], np.asarray(classes), maps, scores_before=before)
        return float(np.nanmean(scores))
    return run.cache.cached("faithfulness", compute, idx, classes, np.asarray(maps, np.float32))


# ---------------------------------------------------------------------- steps
def class_galleries(run: Run, conf: Optional[Confusion] = None, show: int = 3) -> ClassGalleries:
    """Best and worst predictions with CAMs for the CLASS_GALLERIES weakest classes (one PNG per class; "all":
    every class); the `show` weakest are also returned for display."""
    from tqdm.auto import tqdm
    p, pr, out = run.params, run.preds, run.outputs
    n_classes = run.data.num_classes
    cm = conf.cm if conf is not None else metrics.confusion_matrix(pr.labels, pr.preds, n_classes)
    order = weakest_classes(cm)
    n_drawn = class_gallery_count(p.CLASS_GALLERIES, n_classes)
    classes = sorted(int(c) for c in order[:n_drawn])   # drawn in class order: the files list reads as a listing
    need = []   # every CAM the galleries need, in one batched request
    for cls in classes:
        worst, best = metrics.gallery_examples(pr.labels, pr.preds, pr.probs, cls, p.N_WORST, p.N_BEST)
        need += _class_cams_needed(pr, cls, worst, best)
    run.cams.prefetch(need)
    sec = ClassGalleries()
    shown = set(int(c) for c in order[:min(show, n_drawn)])
    for cls in tqdm(classes, desc="Class galleries", unit="class", disable=not run.progress):
        name = run.gallery_filename(cls)
        rel = f"worst_predictions/{name}"
        sec.files.append(rel)
        content = class_gallery_content(run, cls)
        if cls in shown:
            sec.figures[name] = render_gallery(*content)
            out.save_figure(sec.figures[name], "worst_predictions", name)
        elif not out.unchanged(rel, digest([_DRAWING_CODE, content]), force=p.FORCE_RECOMPUTE):
            # drawn and encoded by the figure worker, off this process
            out.save_rendered(render_gallery, content, "worst_predictions", name)
    if n_drawn < n_classes:
        sec.notes.append(f"Galleries of the {n_drawn} weakest of {n_classes} classes (lowest accuracy first; "
                         f'CLASS_GALLERIES={p.CLASS_GALLERIES!r}, "all" draws every class). '
                         "Any class on demand: an.class_gallery(class_id), or the widget.")
    engine, store = run.cams.engine(), run.cams
    sec.cam_path, sec.n_from_activations = engine.path, store.n_from_activations
    how = (f"; {store.n_from_activations} of {store.n_computed} CAMs from activations kept in the inference pass"
           if store.n_from_activations else "")
    sec.notes.append(f"CAM path: {engine.path} (layer {engine.layer_name}{how})")
    return sec


def pair_galleries(run: Run, conf: Confusion) -> PairGalleries:
    p, names = run.params, run.names
    sec = PairGalleries()
    faith_idx, faith_cls, faith_cams = [], [], []
    for k, row in enumerate(conf.pairs.head(p.N_PAIR_GALLERIES).itertuples(), start=1):
        t, q = int(row.true_id), int(row.pred_id)
        idx, rows, _, cam_p, _ = pair_rows(run, t, q, p.PAIR_EXAMPLES)
        title = f"Pair {k}: {names[t]} → {names[q]} — {row.count} errors ({row.share_of_true:.1%} of {names[t]})"
        img = render_gallery(title, [(f"{len(rows)} most confident {names[t]} → {names[q]} errors", rows)])
        name = f"confused_pair_{k}_{run.class_slug(t)}_to_{run.class_slug(q)}.png"
        run.outputs.save_figure(img, name)
        sec.files.append(name)
        sec.figures[name] = img
        take = LARGE_ROAD_PER_PAIR if run.large_images else len(idx)
        faith_idx += idx[:take]
        faith_cls += [q] * len(idx[:take])
        faith_cams.append(cam_p[:take])
    if faith_idx:
        # scored on the predicted class: a misclassified image has little true-class probability left to lose
        sec.faithfulness = {p.CAM_METHOD: road_score(run, faith_idx, faith_cls, np.concatenate(faith_cams))}
        sec.n_faithfulness_images = len(faith_idx)
        if run.large_images:
            sec.notes.append(f"ROAD faithfulness on the first {LARGE_ROAD_PER_PAIR} images of each pair gallery "
                             f"({len(faith_idx)} images; large images cost a model pass per imputed copy).")
    return sec
