"""Failure modes inside one confusion: for every top confused pair, whether its errors are one kind of mistake
or several. Clusters each pair's errors on their penultimate features and their true-minus-predicted CAM
(compute/modes.py: k = 1..4, chosen by silhouette), describes each mode (size, mean confidence, share of wrong
test labels, image-property means, where the predicted class's CAM looks), draws one figure per pair
(plots/modes.py). Writes `deep_dive/failure_modes.csv` (a row per mode) and
`deep_dive/failure_modes_<k>_<true>_to_<pred>.png` for the first N_PAIR_GALLERIES pairs.

Wrong labels and properties come from the data step (DataCauses): without it (`data=None`) those columns are
absent. LabelEvidence keeps no per-image mask, so the mask is rebuilt here with the same public functions it uses.
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from helpers.compute import modes as M
from helpers.files.png import preview_data_uri
from helpers.plots.modes import MAX_IMAGES, ModeRow, plot_failure_modes
from helpers.steps.confusion import Confusion
from helpers.steps.context import Run, Section

SUB = "deep_dive"
CSV = f"{SUB}/failure_modes.csv"
MAX_ERRORS = 2000        # more errors in one pair than this: a seeded sample is clustered (CAMs cost memory)
# ... and fewer at large images: both CAMs of every clustered error, float32 (the float64 steps over them hold ~4x
# more). At 256 MB a 20,000-image 224 px run clustered 668 errors per pair and peaked at 2.5 GB against 1.7 GB
# for 2,000 images; 167 errors per pair still give k-means 2..MAX_MODES modes of MIN_MODE_SIZE.
MAX_CAM_BYTES = 64 << 20
COSTLY_MAX_ERRORS = 60   # run.costly_cams: each CAM a model pass (ViT tail path: 2 x 167 per pair, minutes)
# ... and for the pairs past N_PAIR_GALLERIES (no figure, a table row): a 2,000-image 224 px ViT-Ti run spent
# 17.6 s of its 33 s model causes on 15 pairs x 60 errors; 24 still allow MAX_MODES modes of MIN_MODE_SIZE
COSTLY_LATER_ERRORS = 24
CAM_BATCH = 256


@dataclass(frozen=True)
class Mode:
    mode: int                         # 1..k, the largest first
    indices: list[int]                # its test images, most typical (nearest its centre) first
    size: int
    mean_conf: float                  # mean probability of the predicted (wrong) class
    wrong_label_share: float          # share of its images with a wrong label (validated or suspected); NaN: no data
    property_means: dict[str, float]  # data step's per-image properties, averaged (NaN-aware); {}: no data
    cam_cy: float                     # mean centroid of the predicted class's CAM, fraction of the height
    cam_cx: float                     # ... of the width
    cam_area: float                   # mean share of pixels above CAM_LEVEL of the map's max


@dataclass(frozen=True)
class PairModes:
    true_id: int
    pred_id: int
    label: str                        # "Shirt → T-shirt/top"
    n_errors: int                     # errors of the pair
    n_clustered: int                  # of them clustered (all unless over MAX_ERRORS)
    k: int
    silhouettes: dict[int, float]     # k -> silhouette (k >= 2 tried)
    reason: str                       # why this k
    modes: list[Mode]
    figure: str = ""                  # its PNG, "" when not drawn


@dataclass(kw_only=True)
class FailureModes(Section):
    title: str = "Failure modes inside one confusion"
    pairs: list[PairModes] = field(default_factory=list)
    modes: pd.DataFrame = field(default_factory=pd.DataFrame)   # a row per (pair, mode), as the CSV
    wrong_label_source: str = ""       # "human-validated", "suspected (unvalidated)" or "" (no data step)
    property_names: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _wrong_labels(run: Run, data) -> tuple[Optional[np.ndarray], str]:
    """The per-image wrong-label mask the data step counted: people's verdicts when it had them, else its
    confident-learning estimate."""
    labels = getattr(data, "labels", None)
    if labels is None or labels.wrong is None:
        return None, ""
    return labels.wrong, "human-validated" if labels.validated else "suspected (unvalidated)"


def _cams(run: Run, idx: np.ndarray, t: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image's CAM for class t and for class q, both asked at once (the engine runs each image once)."""
    parts_t, parts_q = [], []
    with run.model_threads():
        for s in range(0, len(idx), CAM_BATCH):
            b = idx[s:s + CAM_BATCH].tolist()
            both = run.cams.get(b + b, [t] * len(b) + [q] * len(b))
            parts_t.append(both[:len(b)])
            parts_q.append(both[len(b):])
    empty = np.zeros((0, 1, 1), np.float32)
    return (np.concatenate(parts_t) if parts_t else empty), (np.concatenate(parts_q) if parts_q else empty)


def _typical_first(x: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Positions of `members` ordered by distance to their mean in the clustering representation."""
    d = ((x[members] - x[members].mean(axis=0)) ** 2).sum(axis=1)
    return members[np.argsort(d, kind="stable")]


def pair_modes(run: Run, t: int, q: int, wrong: Optional[np.ndarray], props: Optional[pd.DataFrame],
               prop_names: list[str], drawn: bool = True) -> tuple[PairModes, np.ndarray, np.ndarray, np.ndarray]:
    """One pair: (its PairModes, the clustered indices, their mode numbers 1..k, the difference maps). `drawn`:
    the pair gets a figure (with costly CAMs the others cluster fewer errors)."""
    pr = run.preds
    idx = np.flatnonzero((pr.labels == t) & (pr.preds == q))
    n_errors = len(idx)
    h, w = run.data.images.shape[1:3]
    costly = COSTLY_MAX_ERRORS if drawn else COSTLY_LATER_ERRORS
    cap = max(M.MIN_ERRORS, min(costly if run.costly_cams else MAX_ERRORS,
                                MAX_CAM_BYTES // (8 * h * w)))   # 2,000 at 32 px, 167 at 224 px
    if n_errors > cap:
        idx = np.sort(np.random.default_rng(run.params.SEED).choice(idx, cap, replace=False))
    if not len(idx):
        return (PairModes(true_id=t, pred_id=q, label=f"{run.names[t]} → {run.names[q]}", n_errors=0, n_clustered=0,
                          k=0, silhouettes={}, reason="no errors", modes=[]),
                idx, np.zeros(0, np.int64), np.zeros((0, 1, 1)))
    cam_t, cam_p = _cams(run, idx, t, q)
    x = M.representation(pr.features[idx], cam_t, cam_p)
    choice = M.choose_modes(x, seed=run.params.SEED)
    cy, cx, area = M.cam_centroid_area(cam_p)
    conf = pr.probs[idx, q].astype(np.float64)
    modes = []
    for m in range(choice.k):
        pos = _typical_first(x, np.flatnonzero(choice.labels == m))
        members = idx[pos]
        means = {}
        if props is not None:
            rows = props.reindex(members)
            means = {c: M.nanmean(rows[c].to_numpy(np.float64)) for c in prop_names}
        modes.append(Mode(mode=m + 1, indices=[int(i) for i in members], size=int(len(members)),
                          mean_conf=float(conf[pos].mean()),
                          wrong_label_share=float(wrong[members].mean()) if wrong is not None else float("nan"),
                          property_means=means, cam_cy=M.nanmean(cy[pos]), cam_cx=M.nanmean(cx[pos]),
                          cam_area=M.nanmean(area[pos])))
    res = PairModes(true_id=t, pred_id=q, label=f"{run.names[t]} → {run.names[q]}", n_errors=n_errors,
                    n_clustered=len(idx), k=choice.k, silhouettes=dict(choice.silhouettes), reason=choice.reason,
                    modes=modes)
    return res, idx, choice.labels + 1, cam_t - cam_p


def _table(pairs: list[PairModes], with_labels: bool, prop_names: list[str]) -> pd.DataFrame:
    rows = []
    for p in pairs:
        for m in p.modes:
            row = {"pair": p.label, "true_id": p.true_id, "pred_id": p.pred_id, "n_errors": p.n_errors, "k": p.k,
                   "silhouette": p.silhouettes.get(p.k, np.nan) if p.k > 1 else
                   max((v for v in p.silhouettes.values() if np.isfinite(v)), default=np.nan),
                   "mode": m.mode, "size": m.size, "mean_conf": m.mean_conf, "cam_cy": m.cam_cy, "cam_cx": m.cam_cx,
                   "cam_area": m.cam_area}
            row.update({f"silhouette_k{k}": p.silhouettes.get(k, np.nan) for k in range(2, M.MAX_MODES + 1)})
            if with_labels:
                row["wrong_label_share"] = m.wrong_label_share
            row.update({f"{c}_mean": m.property_means.get(c, np.nan) for c in prop_names})
            row["reason"] = p.reason
            rows.append(row)
    cols = ["pair", "true_id", "pred_id", "n_errors", "k", "silhouette", "mode", "size", "mean_conf", "cam_cy",
            "cam_cx", "cam_area"] + [f"silhouette_k{k}" for k in range(2, M.MAX_MODES + 1)] + (["wrong_label_share"] if with_labels else []) \
        + [f"{c}_mean" for c in prop_names] + ["reason"]
    return pd.DataFrame(rows, columns=cols)


def _caption(m: Mode, n: int, source: str) -> str:
    wrong = "" if not source or not np.isfinite(m.wrong_label_share) else \
        f", wrong labels ({source.split(' ')[0]}) {m.wrong_label_share:.0%}"
    return (f"mode {m.mode}: {m.size} of {n} errors, mean confidence {m.mean_conf:.2f}{wrong}, "
            f"CAM at y {m.cam_cy:.2f} x {m.cam_cx:.2f}, area {m.cam_area:.2f}")


def _figure(run: Run, p: PairModes, idx: np.ndarray, mode_no: np.ndarray, diff: np.ndarray, source: str):
    rows = []
    for m in p.modes:
        shown = m.indices[:MAX_IMAGES]
        cams = run.cams.get([int(i) for i in shown], [p.pred_id] * len(shown))   # held since pair_modes asked
        rows.append(ModeRow(caption=_caption(m, p.n_clustered, source), mean_diff=diff[mode_no == m.mode].mean(axis=0),
                            images=run.overlays(shown, cams),
                            titles=[f"#{i} · {run.preds.probs[i, p.pred_id]:.2f}" for i in shown]))
    sil = ", ".join(f"k={k}: {v:.2f}" for k, v in sorted(p.silhouettes.items()) if np.isfinite(v))
    return plot_failure_modes(f"{p.label}: {p.k} failure mode{'s' if p.k > 1 else ''}", rows,
                              f"{p.reason}" + (f" (silhouettes {sil})" if sil else "")
                              + f"; images: overlay of the CAM for {run.names[p.pred_id]}")


def failure_modes(run: Run, conf: Confusion, data=None) -> FailureModes:
    """Failure modes of every pair of conf.pairs; a figure for each of the first N_PAIR_GALLERIES. `data`: the
    DataCauses of the run (for the wrong-label shares and property means), or None."""
    start = time.perf_counter()
    wrong, source = _wrong_labels(run, data)
    slices = getattr(data, "properties", None)
    props = slices.properties.set_index("index") if slices is not None else None
    prop_names = list(slices.property_names) if slices is not None else []
    sec = FailureModes(wrong_label_source=source, property_names=prop_names)
    if run.cams is None or run.preds.features is None:
        sec.notes.append("Failure modes: skipped (needs CAMs and the penultimate features).")
        sec.modes = _table([], wrong is not None, prop_names)
        return sec
    todo = [(int(r.true_id), int(r.pred_id)) for r in conf.pairs.itertuples()]
    for k, (t, q) in enumerate(tqdm(todo, desc="failure modes", disable=not run.progress), start=1):
        res, idx, mode_no, diff = pair_modes(run, t, q, wrong, props, prop_names,
                                             drawn=k <= run.params.N_PAIR_GALLERIES)
        if k <= run.params.N_PAIR_GALLERIES and res.modes:
            name = f"failure_modes_{k}_{run.class_slug(t)}_to_{run.class_slug(q)}.png"
            fig = _figure(run, res, idx, mode_no, diff, source)
            run.outputs.save_figure(fig, SUB, name)
            sec.figures[f"failure_modes_{k}"] = fig
            sec.files.append(f"{SUB}/{name}")
            res = PairModes(**{**res.__dict__, "figure": f"{SUB}/{name}"})
        sec.pairs.append(res)
    sec.modes = _table(sec.pairs, wrong is not None, prop_names)
    run.outputs.save_csv(sec.modes, SUB, "failure_modes.csv")
    sec.files.insert(0, CSV)
    sec.seconds = time.perf_counter() - start
    sec.notes += summary_lines(sec)
    return sec


def _mode_sentence(m: Mode, sec: FailureModes) -> str:
    s = f"mode {m.mode}: {m.size} errors, mean confidence {m.mean_conf:.2f}"
    if sec.wrong_label_source and np.isfinite(m.wrong_label_share):
        s += f", {m.wrong_label_share:.0%} {sec.wrong_label_source} wrong labels"
    s += f", CAM of the predicted class centred at (y {m.cam_cy:.2f}, x {m.cam_cx:.2f}), area {m.cam_area:.2f}"
    return s


def summary_lines(sec: FailureModes) -> list[str]:
    """Plain-English lines for analysis_summary.txt."""
    lines = [f"Failure modes inside one confusion ({CSV}): each pair's errors clustered (k-means) on their "
             f"penultimate features and their true-minus-predicted CAM on a {M.CAM_GRID}x{M.CAM_GRID} grid (equal "
             f"weight); more than one mode only when the best silhouette over k = 2..{M.MAX_MODES} reaches "
             f"{M.MIN_SILHOUETTE} with every mode >= {M.MIN_MODE_SIZE} errors (pairs under {M.MIN_ERRORS} errors: "
             f"one mode)."]
    if not sec.wrong_label_source:
        lines.append("  Without the data step: no wrong-label shares or property means.")
    several = [p for p in sec.pairs if p.k > 1]
    lines.append(f"  {len(several)} of {len(sec.pairs)} pairs split into several modes.")
    for p in sec.pairs:
        if p.k > 1:
            lines.append(f"  {p.label}: {p.k} modes ({p.reason}).")
            lines += ["    " + _mode_sentence(m, sec) for m in p.modes]
    ones = [p for p in sec.pairs if p.k == 1]
    if ones:
        lines.append("  One mode: " + "; ".join(f"{p.label} ({p.reason.split(':')[0]})" for p in ones[:8])
                     + (f"; and {len(ones) - 8} more" if len(ones) > 8 else "") + ".")
    return lines


def index_section(run: Run, sec: FailureModes) -> str:
    """HTML fragment for index.html: a table of the modes and each pair's figure."""
    esc = html.escape
    wl = bool(sec.wrong_label_source)
    head = ("<tr><th>pair</th><th>errors</th><th>modes</th><th>why</th><th>mode</th><th>size</th>"
            "<th>mean confidence</th>" + (f"<th>wrong labels ({esc(sec.wrong_label_source)})</th>" if wl else "")
            + "<th>CAM centre (y, x)</th><th>CAM area</th></tr>")
    body = []
    for p in sec.pairs:
        for m in p.modes:
            share = f"<td>{m.wrong_label_share:.0%}</td>" if wl and np.isfinite(m.wrong_label_share) else \
                ("<td></td>" if wl else "")
            body.append(f"<tr><td>{esc(p.label)}</td><td>{p.n_errors}</td><td>{p.k}</td><td>{esc(p.reason)}</td>"
                        f"<td>{m.mode}</td><td>{m.size}</td><td>{m.mean_conf:.2f}</td>{share}"
                        f"<td>{m.cam_cy:.2f}, {m.cam_cx:.2f}</td><td>{m.cam_area:.2f}</td></tr>")
    run.outputs.flush()   # the PNGs are written in the background
    imgs = []
    for p in sec.pairs:
        uri = preview_data_uri(run.outputs.current(p.figure)) if p.figure else None
        if uri:
            imgs.append(f'<p><img src="{uri}" alt="failure modes: {esc(p.label)}" style="max-width:100%"></p>')
    return (f"<h2>{esc(sec.title)}</h2><p>Per confused pair: are its errors one kind of mistake or several? "
            f"Clustered on the penultimate features and the true-minus-predicted CAM; several modes only when the "
            f"silhouette reaches {M.MIN_SILHOUETTE} (<a href=\"{esc(CSV)}\">{esc(CSV)}</a>).</p>"
            f"<table>{head}{''.join(body)}</table>" + "".join(imgs))
