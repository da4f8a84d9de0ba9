"""Method comparison: the confused group's most confident errors under every fast attribution method (Captum's
saliency, Input x Gradient, SmoothGrad, Integrated Gradients, GradientShap; attention and rollout for ViTs), for
the true and the predicted class, with each method's ROAD faithfulness score against seeded random maps, so a
user sees which method to trust on this model. Computes with helpers/model/attributions.py, draws with
helpers/plots/attributions.py, writes `deep_dive/method_comparison.png` and `deep_dive/method_comparison.csv`.

LIME and KernelShap cost hundreds of forward passes per image: only when named in `methods`.
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from helpers.files.png import preview_data_uri
from helpers.model.attributions import ATTRIBUTION_METHODS, attribute, check_attribution_method, methods_for
from helpers.model.cam_trust import tie_broken
from helpers.plots.attributions import MethodMaps, plot_method_comparison
from helpers.steps.confusion import Confusion
from helpers.steps.context import Run, Section
from helpers.steps.galleries import road_score

SUB = "deep_dive"
CSV, PNG = f"{SUB}/method_comparison.csv", f"{SUB}/method_comparison.png"
N_IMAGES = 4        # the group's most confident errors shown and scored
# Above this many pixels per image, Run All keeps to the one-backward-pass methods on N_IMAGES_LARGE images: at
# 224 px IG (64 steps), SmoothGrad and GradientShap (16 samples) cost ~800 forward+backward passes for 4 images,
# more than a 2,000-image inference pass. Named methods (`methods=`) always run as asked.
LARGE_PIXELS = 64 * 64
ONE_PASS = ("saliency", "inputxgradient", "attention", "rollout")
N_IMAGES_LARGE = 2
BASELINE = "black"  # for Integrated Gradients, GradientShap, LIME, KernelShap


@dataclass(kw_only=True)
class MethodComparison(Section):
    title: str = "Attribution method comparison"
    indices: list[int] = field(default_factory=list)      # the images (test-set indices), most confident first
    true_classes: list[int] = field(default_factory=list)
    pred_classes: list[int] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    maps_true: dict = field(default_factory=dict)          # method -> (N, H, W) maps for the true class
    maps_pred: dict = field(default_factory=dict)          # method -> (N, H, W) maps for the predicted class
    scores: Optional[pd.DataFrame] = None                  # per method: road, road_random, road_gain, seconds_per_map
    road_random: Optional[float] = None                    # ROAD of the seeded random maps on the same images
    baseline: str = BASELINE
    seconds: float = 0.0


def group_errors(run: Run, group: Sequence[int], n: int = N_IMAGES) -> np.ndarray:
    """Up to n images whose true and predicted classes are both in `group` and differ, most confident in the
    predicted class first (ties by index)."""
    pr = run.preds
    g = np.asarray(list(group), dtype=np.int64)
    idx = np.flatnonzero(np.isin(pr.labels, g) & np.isin(pr.preds, g) & (pr.labels != pr.preds))
    order = np.lexsort((idx, -pr.probs[idx, pr.preds[idx]]))
    return idx[order][:max(int(n), 0)].astype(np.int64)


def method_comparison(run: Run, conf: Confusion, deep, methods: Optional[Sequence[str]] = None,
                      n_images: int = N_IMAGES, baseline: str = BASELINE) -> MethodComparison:
    """Every method's maps for the true and predicted class of the group's most confident errors; ROAD (most
    relevant first, on p(predicted), as the group galleries score their CAM) per method and for seeded random
    maps. `deep`: the DeepDive (its group); `methods`: None = every fast method that applies to the model."""
    start = time.perf_counter()
    model = run.model.module
    names = list(methods) if methods is not None else methods_for(model)
    names = [check_attribution_method(m) for m in names]
    h, w = run.inputs.shape[-2:]
    reduced = methods is None and h * w > LARGE_PIXELS
    if reduced:
        skipped = [m for m in names if m not in ONE_PASS]
        names, n_images = [m for m in names if m in ONE_PASS], min(n_images, N_IMAGES_LARGE)
    idx = group_errors(run, deep.group.group, n_images)
    sec = MethodComparison(indices=[int(i) for i in idx], methods=names, baseline=baseline,
                           true_classes=[int(run.preds.labels[i]) for i in idx],
                           pred_classes=[int(run.preds.preds[i]) for i in idx])
    rows = []
    if len(idx):
        x = run.inputs[idx.tolist()]
        seed = run.params.SEED
        kw = dict(baseline=baseline, mean=run.data.mean, std=run.data.std, seed=seed)
        random_maps = np.random.default_rng(seed).random((len(idx),) + tuple(x.shape[-2:]), dtype=np.float32)
        sec.road_random = road_score(run, sec.indices, sec.pred_classes, random_maps)
        from tqdm.auto import tqdm
        for m in tqdm(names, desc="attribution methods", unit="method", disable=not run.progress):
            t0 = time.perf_counter()
            with run.model_threads():   # every map is tens of model passes: all the threads, not half
                both = run.cache.cached("attribution_maps", lambda: attribute(
                    model, x.repeat(2, 1, 1, 1), sec.true_classes + sec.pred_classes, m, **kw),
                    sec.indices, sec.true_classes, sec.pred_classes, m, baseline, seed)
            spent = time.perf_counter() - t0
            sec.maps_true[m], sec.maps_pred[m] = both[:len(idx)], both[len(idx):]
            # ties broken first: IG and Input x Gradient are exactly 0 on black pixels, and ROAD (which keeps the
            # pixels strictly below the 80th percentile) would impute most of a black-background image
            road = road_score(run, sec.indices, sec.pred_classes, tie_broken(sec.maps_pred[m], seed))
            rows.append({"method": m, "cost": ATTRIBUTION_METHODS[m].cost,
                         "aggregation": ATTRIBUTION_METHODS[m].aggregation, "road": road,
                         "road_random": sec.road_random, "road_gain": road - sec.road_random,
                         "seconds_per_map": spent / (2 * len(idx)), "n_images": len(idx)})
    if reduced and skipped:
        sec.notes.append(f"At {h}x{w} px the comparison keeps to the one-pass methods on {len(idx)} images; "
                         f"{', '.join(skipped)} take 16-64 passes per map: an.method_comparison(methods=[...]) runs "
                         "them.")
    sec.scores = pd.DataFrame(rows, columns=["method", "cost", "aggregation", "road", "road_random", "road_gain",
                                             "seconds_per_map", "n_images"])
    run.outputs.save_csv(sec.scores, SUB, "method_comparison.csv")
    fig = plot_method_comparison([run.data.images[i] for i in idx], [run.conf_title(int(i)) for i in idx],
                                 [MethodMaps(m, sec.maps_true[m], sec.maps_pred[m],
                                             signed=ATTRIBUTION_METHODS[m].aggregation == "sum",
                                             score=_road_label(sec, m)) for m in sec.maps_true],
                                 title="Attribution methods on the confused group's most confident errors")
    sec.figures["method_comparison"] = fig
    run.outputs.save_figure(fig, SUB, "method_comparison.png")
    sec.files += [PNG, CSV]
    sec.seconds = time.perf_counter() - start
    sec.notes += summary_lines(sec)
    return sec


def _road_label(sec: MethodComparison, m: str) -> str:
    """The score printed over the predicted-class column: ROAD is measured on the predicted class's maps."""
    row = sec.scores[sec.scores["method"] == m]
    return f"ROAD {row['road'].iloc[0]:+.3f} (random {sec.road_random:+.3f})" if len(row) else ""


def summary_lines(sec: MethodComparison) -> list[str]:
    """Plain-English lines for analysis_summary.txt."""
    if not sec.indices:
        return ["Attribution method comparison: no errors between the confused group's classes, nothing to compare."]
    lines = [f"Attribution method comparison ({CSV}): {len(sec.indices)} most confident errors of the confused group; "
             f"ROAD most-relevant-first on p(predicted) (more negative = the map finds evidence the model uses); "
             f"seeded random maps score {sec.road_random:+.4f}. Baseline for IG/GradientShap: {sec.baseline}."]
    for r in sec.scores.sort_values("road", kind="stable").itertuples():
        verdict = "better than random" if r.road < r.road_random else "NOT better than random: do not trust it here"
        lines.append(f"  {r.method}: ROAD {r.road:+.4f} ({r.road_gain:+.4f} vs random, {verdict}); "
                     f"{r.seconds_per_map * 1000:.1f} ms per map")
    if any(ATTRIBUTION_METHODS[m].aggregation == "attention" for m in sec.methods):
        lines.append("  attention and rollout are attention weights, not attributions: they ignore the class.")
    return lines


def index_section(run: Run, sec: MethodComparison) -> str:
    """HTML fragment for index.html: the scores table and the figure."""
    esc = html.escape
    head = "<tr><th>method</th><th>cost</th><th>ROAD</th><th>vs random</th><th>ms per map</th></tr>"
    body = "".join(f"<tr><td>{esc(r.method)}</td><td>{esc(r.cost)}</td><td>{r.road:+.4f}</td>"
                   f"<td>{r.road_gain:+.4f}</td><td>{r.seconds_per_map * 1000:.1f}</td></tr>"
                   for r in sec.scores.itertuples()) if sec.scores is not None else ""
    run.outputs.flush()   # the PNG is written in the background
    uri = preview_data_uri(run.outputs.current(PNG))
    img = f'<p><img src="{uri}" alt="method comparison" style="max-width:100%"></p>' if uri else ""
    random = f" Seeded random maps: {sec.road_random:+.4f}." if sec.road_random is not None else ""
    return (f"<h2>{esc(sec.title)}</h2><p>The confused group's {len(sec.indices)} most confident errors under each "
            f"attribution method, for the true and the predicted class. ROAD (most relevant first, on p(predicted)): "
            f"more negative than the random maps = the method points at evidence the model uses.{esc(random)} "
            f'(<a href="{esc(CSV)}">{esc(CSV)}</a>)</p><table>{head}{body}</table>' + img)
