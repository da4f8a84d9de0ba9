"""Can these CAMs be trusted for this pair? Three checks on the pair galleries' images (the same images, classes
and CAMs the confused-pair galleries show):

- class sensitivity: the rank correlation of each image's true- and predicted-class CAM. Above NOISE_THRESHOLD
  (median per pair) the two maps rank the pixels alike and the gallery's difference panel is noise;
- randomisation (Adebayo et al., 2018): the same CAMs on a copy of the model with the head, then the head and the
  target layer's block, re-initialised. A map that barely changes (median rank correlation above
  RANDOMISATION_THRESHOLD) does not reflect what the model learned;
- baselines: each CAM method's ROAD score beside seeded random maps and the Sobel edge map of the image, on the
  same images and target. A method that does not beat both is untrustworthy on this data.

Measures with model/cam_trust.py, draws with plots/cam_trust.py, writes `deep_dive/cam_trust.csv` and
`deep_dive/cam_trust.png`. run.model is never changed: the randomised models are deep copies.
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from helpers.compute import metrics
from helpers.files.png import preview_data_uri
from helpers.model import cam_trust as T
from helpers.model.cams import CLASS_AGNOSTIC_METHODS, CamEngine
from helpers.model.faithfulness import SoftmaxContrastTarget, faithfulness
from helpers.plots.cam_trust import TrustFigure, plot_cam_trust
from helpers.plots.overlay import to_rgb_uint8
from helpers.steps.confusion import Confusion
from helpers.steps.context import Run, Section
from helpers.steps.galleries import road_score

SUB = "deep_dive"
CSV, PNG = f"{SUB}/cam_trust.csv", f"{SUB}/cam_trust.png"
NOISE_THRESHOLD = 0.9            # median true- vs predicted-class rank correlation above this: the difference is noise
RANDOMISATION_THRESHOLD = T.RANDOMISATION_THRESHOLD
ROAD_TIE_BREAK = True            # score tie-broken maps: every map removes the same 20% (see T.tie_broken)
FINER_KEY = "finercam (true vs predicted)"   # as deep_dive.FINER_KEY: the same map, scored the same way
LARGE_PER_PAIR = 2               # large images (run.large_images): pair-gallery images per pair checked
PAIR_COLUMNS = ["true_id", "pred_id", "pair", "n_images", "class_sensitivity_median", "difference_is_noise"]


@dataclass(kw_only=True)
class CamTrust(Section):
    title: str = "Can these CAMs be trusted?"
    method: str = ""                 # CAM_METHOD, as the engine names it
    layer: str = ""                  # the target layer the CAMs (and the randomised copies' CAMs) are taken at
    pairs: pd.DataFrame              # per pair gallery: PAIR_COLUMNS
    images: pd.DataFrame             # per image shown: index, true_id, pred_id, class_sensitivity, and per
    #                                  randomisation stage rand_head_pred, rand_head_true, rand_head_last_block_pred,
    #                                  ... (rank corr with the randomised copy's CAM of that class)
    randomisation: pd.DataFrame      # per stage: T.RANDOMISATION_COLUMNS (stage, randomised, ..., flagged)
    road: pd.DataFrame               # per method: T.ROAD_COLUMNS (method, target, road, random, sobel, ...,
    #                                  trustworthy) and sparse_maps (its maps untreated ROAD would impute over half of)
    class_sensitivity_median: float = float("nan")   # over every image shown
    n_images: int = 0
    noise_threshold: float = NOISE_THRESHOLD
    randomisation_threshold: float = RANDOMISATION_THRESHOLD
    seconds: float = 0.0             # time this step took (compare with Analysis.timings["inference"])
    example: Optional[int] = None    # the image drawn in cam_trust.png
    skipped: list[str] = field(default_factory=list)   # checks not run, as sentences

    @property
    def untrusted_reason(self) -> str:
        """Why CAM_METHOD's maps should not be read as the model's evidence here ("" when they pass)."""
        why = []
        row = self.road[self.road["method"] == self.method] if len(self.road) else self.road
        if len(row) and not bool(row["trustworthy"].iloc[0]):
            r = row.iloc[0]
            why.append(f"{self.method} does not beat both baselines on ROAD ({r['road']:+.3f}; random maps "
                       f"{r['random']:+.3f}, Sobel edges {r['sobel']:+.3f})")
        flagged = self.randomisation[self.randomisation["flagged"].astype(bool)] if len(self.randomisation) else []
        if len(flagged):
            why.append(f"its maps barely change when the {flagged['stage'].iloc[0]} is randomised (median rank "
                       f"correlation {flagged['median_rank_corr'].iloc[0]:.2f})")
        return "; ".join(why)


def _first_per_pair(true: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Positions of the first k images of every (true, pred) pair, in order."""
    seen: dict[tuple[int, int], int] = {}
    keep = []
    for i, key in enumerate(zip(true.tolist(), pred.tolist())):
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= k:
            keep.append(i)
    return np.asarray(keep, np.int64)


def _empty(columns) -> pd.DataFrame:
    return pd.DataFrame({c: [] for c in columns})


def _gallery_images(run: Run, conf: Confusion) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image indices, true classes, predicted classes) of every pair gallery, as galleries.pair_rows picks them."""
    p, pr = run.params, run.preds
    idx, true, pred = [], [], []
    for row in conf.pairs.head(p.N_PAIR_GALLERIES).itertuples():
        t, q = int(row.true_id), int(row.pred_id)
        chosen = metrics.pair_examples(pr.labels, pr.preds, pr.probs, t, q, p.PAIR_EXAMPLES)
        idx += [int(i) for i in chosen]
        true += [t] * len(chosen)
        pred += [q] * len(chosen)
    return np.asarray(idx, np.int64), np.asarray(true, np.int64), np.asarray(pred, np.int64)


def pair_table(true: np.ndarray, pred: np.ndarray, sensitivity: np.ndarray, names,
               threshold: float = NOISE_THRESHOLD) -> pd.DataFrame:
    """Per (true, pred) pair, in the order first seen: n_images, the median rank correlation of the true- and
    predicted-class CAMs, and whether it is above `threshold` (the difference panel is noise)."""
    rows = []
    for t, q in dict.fromkeys(zip(true.tolist(), pred.tolist())):
        v = sensitivity[(true == t) & (pred == q)]
        v = v[np.isfinite(v)]
        med = float(np.median(v)) if len(v) else float("nan")
        rows.append(dict(true_id=t, pred_id=q, pair=f"{names[t]} → {names[q]}", n_images=int(len(v)),
                         class_sensitivity_median=med, difference_is_noise=bool(med > threshold)))
    return pd.DataFrame(rows, columns=PAIR_COLUMNS) if rows else _empty(PAIR_COLUMNS)


def _cam_fn(engine: CamEngine, run: Run, idx: np.ndarray, classes: np.ndarray):
    """model -> its CAMs for (idx, classes), with the run's method, target layer, batch size and device."""
    def compute(model):
        copy_engine = CamEngine(model, method=engine.method, target_layer=engine.layer_name,
                                input_shape=engine.input_shape, batch_size=engine.batch_size, device=engine.device,
                                tail_of=engine)   # the same modules: the run's torch.fx split, re-rooted
        copy_engine.adopt_verification(engine)   # the same modules: the run's fast-path check holds for the copy
        with run.model_threads():
            return copy_engine.compute(run.inputs[idx], classes, progress=False)
    return compute


def randomisation(run: Run, engine: CamEngine, idx: np.ndarray, classes: np.ndarray,
                  reference: np.ndarray) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The cascading randomisation test of `reference` (the run's CAMs of images `idx` for `classes`). Returns
    (T.RANDOMISATION_COLUMNS per stage, {stage: randomised maps}, {stage: per-map rank correlations})."""
    seed = int(run.params.SEED)
    cam_fn = _cam_fn(engine, run, idx, classes)
    rows, maps, rhos = [], {}, {}
    for st in T.cascade(engine.model, engine.layer_name, engine.num_classes):
        maps[st.label] = run.cache.cached(
            "cam_randomisation", lambda st=st: cam_fn(T.randomised_copy(engine.model, st.modules, seed)),
            engine.method, engine.layer_name, list(st.modules), idx, classes, seed)
        row, rhos[st.label] = T.randomisation_row(st, reference, maps[st.label], RANDOMISATION_THRESHOLD)
        rows.append(row)
    return pd.DataFrame(rows, columns=T.RANDOMISATION_COLUMNS), maps, rhos


def baseline_maps(run: Run, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The two maps that know nothing about the model: seeded uniform noise and the Sobel edges of the image (of
    the input itself, channel-averaged, when the stored images are not the model's input size)."""
    h, w = run.inputs.shape[-2:]
    images = run.data.images[idx]
    sobel = (T.sobel_maps(images) if images.shape[1:3] == (h, w)
             else T.sobel_maps(run.inputs[idx].float().mean(dim=1).numpy()))
    noise = np.random.default_rng(run.params.SEED).random((len(idx), h, w), dtype=np.float32)
    return {"random": noise, "sobel": sobel}


def road_table(run: Run, idx: np.ndarray, true: np.ndarray, pred: np.ndarray, maps: dict[str, np.ndarray],
               baselines: dict[str, np.ndarray], tie_break: bool = ROAD_TIE_BREAK) -> pd.DataFrame:
    """T.ROAD_COLUMNS + sparse_maps per method in `maps`. A plain CAM is scored on p(predicted) (a misclassified
    image has little true-class probability left to lose), FINER_KEY on p(true) - p(predicted), the margin it
    explains; each baseline on the same images and target. tie_break: every map is scored through
    T.tie_broken, so each one removes the same 20% of pixels (sparse_maps counts the method's maps that would
    otherwise have lost over half of their pixels, see T.tie_broken)."""
    seed = int(run.params.SEED)

    def prepared(m: np.ndarray) -> np.ndarray:
        return T.tie_broken(m, seed) if tie_break else m

    rows = []
    for method, m in maps.items():
        if method == FINER_KEY:
            def score(x):
                return _contrast_score(run, idx, true, pred, prepared(x))
            target = "p(true) − p(predicted)"
        else:
            def score(x):
                return road_score(run, idx, pred, prepared(x))
            target = "p(predicted)"
        row = T.road_verdict(method, target, len(idx), score(m), score(baselines["random"]), score(baselines["sobel"]))
        row["sparse_maps"] = int((T.share_removed(m) > 0.5).sum())
        rows.append(row)
    columns = T.ROAD_COLUMNS + ["sparse_maps"]
    return pd.DataFrame(rows, columns=columns) if rows else _empty(columns)


def _contrast_score(run: Run, idx: np.ndarray, true: np.ndarray, pred: np.ndarray, maps: np.ndarray) -> float:
    seed, probs = run.params.SEED, run.preds.probs[idx]
    before = probs[np.arange(len(idx)), true] - probs[np.arange(len(idx)), pred]
    targets = [SoftmaxContrastTarget(t, q) for t, q in zip(true.tolist(), pred.tolist())]
    def compute() -> float:
        with run.model_threads():
            return float(np.nanmean(faithfulness(run.model.module, run.inputs[idx], targets, maps, seed=seed,
                                                 scores_before=before)))
    return run.cache.cached("contrast_faithfulness", compute, idx.tolist(), true.tolist(), pred.tolist(),
                            np.asarray(maps, np.float32), seed)


def _finer(run: Run, engine: CamEngine, idx: np.ndarray, true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return run.cache.cached("finercam", lambda: engine.compute_finer(run.inputs[idx], true, pred, progress=False),
                            engine.method, engine.layer_name, idx.tolist(), true.tolist(), pred.tolist())


def _csv_table(sec: CamTrust) -> pd.DataFrame:
    """The three checks in one long table, told apart by `check`."""
    parts = [sec.pairs.assign(check="class sensitivity", threshold=sec.noise_threshold),
             sec.randomisation.assign(check="randomisation", threshold=sec.randomisation_threshold),
             sec.road.assign(check="ROAD baselines")]
    # counts and ids stay integers where another check's rows leave them empty
    parts = [p.astype({c: "Int64" for c in ("true_id", "pred_id", "n_images", "n_maps", "sparse_maps")
                      if c in p}) for p in parts]
    table = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) \
        else pd.DataFrame({"check": []})
    return table[["check"] + [c for c in table.columns if c != "check"]]


def _figure(run: Run, sec: CamTrust, cam_pred: np.ndarray, randomised: dict[str, np.ndarray],
            baselines: dict[str, np.ndarray], idx: np.ndarray, rhos: dict[str, np.ndarray]) -> TrustFigure:
    correlations = []
    if len(sec.images):
        correlations.append(("class sensitivity\n(true vs pred CAM)", sec.images["class_sensitivity"].to_numpy(),
                             NOISE_THRESHOLD))
    correlations += [(f"randomised: {label}", rho, RANDOMISATION_THRESHOLD) for label, rho in rhos.items()]
    road = [(r.method.replace(" (", "\n("), r.road, r.random, r.sobel) for r in sec.road.itertuples()]
    if not len(idx):
        return TrustFigure(correlations=correlations, road=road)
    k, i = 0, int(idx[0])
    tiles = [("image", to_rgb_uint8(run.data.images[i])),
             (f"{sec.method} → pred: {run.names[int(run.preds.preds[i])]}", run.overlays([i], cam_pred[:1])[0])]
    if randomised:
        label = list(randomised)[-1]
        tiles.append((f"{label} randomised (ρ {rhos[label][k]:+.2f})", run.overlays([i], randomised[label][:1])[0]))
    tiles.append(("Sobel edges (baseline)", run.overlays([i], baselines["sobel"][:1])[0]))
    return TrustFigure(example_title=run.conf_title(i), example=tiles, correlations=correlations, road=road)


def cam_trust(run: Run, conf: Confusion) -> CamTrust:
    """Class sensitivity, cascading randomisation and ROAD against random and Sobel baselines, on the images of
    the pair galleries (conf.pairs.head(N_PAIR_GALLERIES), PAIR_EXAMPLES each)."""
    start = time.perf_counter()
    sec = CamTrust(method=run.params.CAM_METHOD, pairs=_empty(PAIR_COLUMNS),
                   images=_empty(["index", "true_id", "pred_id", "class_sensitivity"]),
                   randomisation=_empty(T.RANDOMISATION_COLUMNS), road=_empty(T.ROAD_COLUMNS + ["sparse_maps"]))
    idx, true, pred = _gallery_images(run, conf) if run.cams is not None else (np.zeros(0, np.int64),) * 3
    if len(idx) and run.large_images:   # randomised copies and ROAD cost several passes per image: the first 2 of each pair
        first = _first_per_pair(true, pred, LARGE_PER_PAIR)
        idx, true, pred = idx[first], true[first], pred[first]
    cam_p = np.zeros((0,) + tuple(run.inputs.shape[-2:]), np.float32)
    randomised, rhos, baselines = {}, {}, {}
    if run.cams is None or run.model is None:
        sec.skipped.append("CAM trust: not measured (no model or CAM store in this run).")
    elif not len(idx):
        sec.skipped.append("CAM trust: no confused pair has errors, so there is no pair-gallery image to check.")
    else:
        engine = run.cams.engine()
        sec.method, sec.layer, sec.n_images = engine.method, engine.layer_name, len(idx)
        with run.model_threads():
            cam_t, cam_p = run.cams.get(idx.tolist(), true.tolist()), run.cams.get(idx.tolist(), pred.tolist())
        sens = T.rank_correlation(cam_t, cam_p)
        sec.images = pd.DataFrame({"index": idx, "true_id": true, "pred_id": pred, "class_sensitivity": sens})
        sec.pairs = pair_table(true, pred, sens, run.names)
        sec.class_sensitivity_median = float(np.nanmedian(sens)) if np.isfinite(sens).any() else float("nan")
        n = len(idx)
        sec.randomisation, both, both_rho = randomisation(run, engine, np.concatenate([idx, idx]),
                                                          np.concatenate([pred, true]), np.concatenate([cam_p, cam_t]))
        for label, rho in both_rho.items():
            col = "rand_" + label.replace(" + ", "_").replace(" ", "_")
            sec.images[f"{col}_pred"], sec.images[f"{col}_true"] = rho[:n], rho[n:]
        randomised, rhos = {label: m[:n] for label, m in both.items()}, both_rho
        baselines = baseline_maps(run, idx)
        maps = {engine.method: cam_p}
        if engine.method not in CLASS_AGNOSTIC_METHODS:   # FinerCAM's base would be Grad-CAM: another method
            maps[FINER_KEY] = _finer(run, engine, idx, true, pred)
        sec.road = road_table(run, idx, true, pred, maps, baselines)
        sec.example = int(idx[0])
    sec.notes += sec.skipped + summary_lines(sec)
    run.outputs.save_csv(_csv_table(sec), SUB, "cam_trust.csv")
    fig = plot_cam_trust(_figure(run, sec, cam_p, randomised, baselines, idx, rhos))
    sec.figures["cam_trust"] = fig
    run.outputs.save_figure(fig, SUB, "cam_trust.png")
    sec.files += [CSV, PNG]
    sec.seconds = time.perf_counter() - start
    return sec


# ---------------------------------------------------------------------------------------------- reading it
def summary_lines(sec: CamTrust) -> list[str]:
    """Plain-English lines for analysis_summary.txt."""
    if not sec.n_images:
        return [f"Can these CAMs be trusted ({CSV})? Not measured: " + (" ".join(sec.skipped) or "no images.")]
    lines = [f"Can these CAMs be trusted ({CSV})? {sec.method} at layer {sec.layer}, on the {sec.n_images} images "
             f"of the {len(sec.pairs)} pair galleries."]
    lines.append(f"  Class sensitivity (rank correlation of each image's true- and predicted-class CAM; above "
                 f"{sec.noise_threshold:g} the two maps rank the pixels alike): median "
                 f"{sec.class_sensitivity_median:.2f} over all images; per pair " + "; ".join(
                     f"{r.pair} {r.class_sensitivity_median:.2f}" for r in sec.pairs.itertuples()) + ".")
    noisy = sec.pairs[sec.pairs["difference_is_noise"]]
    if len(noisy):
        agnostic = (f" ({sec.method} ignores the class: its two maps are the same map.)"
                    if sec.method in CLASS_AGNOSTIC_METHODS else "")
        lines.append(f"  For {', '.join(noisy['pair'])} the difference panel (true − pred) is noise: both CAMs "
                     f"highlight the same pixels. Read FinerCAM (what makes it the true class rather than the "
                     f"predicted one) and the concepts instead.{agnostic}")
    for r in sec.randomisation.itertuples():
        verdict = ("FLAGGED: the CAMs barely change, so they do not reflect what the model learned "
                   "(Adebayo et al., 2018)" if r.flagged else "the CAMs change a lot, as they should")
        lines.append(f"  Randomisation, {r.stage} re-initialised ({r.randomised}): median rank correlation with the "
                     f"trained model's CAMs {r.median_rank_corr:+.2f} over {r.n_maps} maps "
                     f"({r.share_above:.0%} above {sec.randomisation_threshold:g}): {verdict}.")
    for r in sec.road.itertuples():
        missed = [b for b, ok in (("random maps", r.beats_random), ("Sobel edges", r.beats_sobel)) if not ok]
        verdict = ("beats both baselines" if r.trustworthy
                   else f"does not beat {' or '.join(missed)}: UNTRUSTWORTHY for this data")
        lines.append(f"  ROAD (most relevant first, change of {r.target}; lower = more faithful): {r.method} "
                     f"{r.road:+.4f}, random maps {r.random:+.4f}, Sobel edges {r.sobel:+.4f}: {verdict}.")
        if r.sparse_maps:
            lines.append(f"    ({r.sparse_maps} of its {r.n_images} maps are flat (mostly 0) over so much of the image "
                         f"that ROAD, scoring them as they are, would impute over half of it instead of its top 20%; "
                         f"ties were broken at random so that every map loses the same 20%.)")
    return lines


def index_section(run: Run, sec: CamTrust) -> str:
    """HTML fragment for index.html: the three checks as tables and the figure."""
    esc = html.escape

    def yes(flag: bool, bad: str, good: str) -> str:
        return f"<b>{esc(bad)}</b>" if flag else esc(good)

    if not sec.n_images:
        body = f"<p>{esc(' '.join(sec.skipped) or 'Not measured.')}</p>"
    else:
        pairs = "".join(f"<tr><td>{esc(r.pair)}</td><td>{r.n_images}</td><td>{r.class_sensitivity_median:.2f}</td>"
                        f"<td>{yes(r.difference_is_noise, 'noise: read FinerCAM', 'informative')}</td></tr>"
                        for r in sec.pairs.itertuples())
        rand = "".join(f"<tr><td>{esc(r.stage)}</td><td>{esc(r.randomised)}</td><td>{r.n_maps}</td>"
                       f"<td>{r.median_rank_corr:+.2f}</td>"
                       f"<td>{yes(r.flagged, 'flagged: not what the model learned', 'changes: ok')}</td></tr>"
                       for r in sec.randomisation.itertuples())
        road = "".join(f"<tr><td>{esc(r.method)}</td><td>{esc(r.target)}</td><td>{r.road:+.4f}</td>"
                       f"<td>{r.random:+.4f}</td><td>{r.sobel:+.4f}</td>"
                       f"<td>{yes(not r.trustworthy, 'untrustworthy', 'beats both')}</td></tr>"
                       for r in sec.road.itertuples())
        body = (f"<p>{esc(sec.method)} at layer {esc(sec.layer)}, on the {sec.n_images} pair-gallery images "
                f'(<a href="{esc(CSV)}">{esc(CSV)}</a>).</p>'
                f"<h3>Class sensitivity</h3><p>Rank correlation of each image's true- and predicted-class CAM; a "
                f"median above {sec.noise_threshold:g} makes the difference panel noise.</p><table><tr><th>pair"
                f"</th><th>images</th><th>median ρ</th><th>difference panel</th></tr>{pairs}</table>"
                f"<h3>Randomisation (Adebayo et al., 2018)</h3><p>The same CAMs on a copy of the model with these "
                f"layers re-initialised; a median above {sec.randomisation_threshold:g} is flagged.</p><table><tr>"
                f"<th>stage</th><th>re-initialised</th><th>maps</th><th>median ρ</th><th>verdict</th></tr>{rand}"
                f"</table><h3>ROAD against baselines</h3><p>Most relevant first, lower = more faithful; a method "
                f"must beat both the random maps and the Sobel edge map.</p><table><tr><th>method</th><th>target"
                f"</th><th>ROAD</th><th>random maps</th><th>Sobel edges</th><th>verdict</th></tr>{road}</table>")
    run.outputs.flush()   # the PNG is written in the background
    uri = preview_data_uri(run.outputs.current(PNG))
    img = f'<p><img src="{uri}" alt="CAM trust checks" style="max-width:100%"></p>' if uri else ""
    return f"<h2>{esc(sec.title)}</h2>{body}{img}"
