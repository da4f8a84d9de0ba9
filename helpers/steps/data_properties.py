"""Which kinds of image go wrong: per confused pair, the image properties (brightness, contrast, colourfulness,
sharpness, edge density, where the predicted class's CAM looks) that separate a class's errors from its correctly
classified images. Measures with compute/properties.py, draws with plots/properties.py, writes
`deep_dive/property_slices.csv` and `deep_dive/property_slices.png`.

Image folders: the Dataset records no per-image original size (only `resize_note`), so size and aspect are not
among the properties. CAMs are computed only for the images of the tested classes (not the whole test set).
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from helpers.compute import properties as P
from helpers.files.png import preview_data_uri
from helpers.plots.properties import SlicePanel, plot_property_slices
from helpers.steps.confusion import Confusion
from helpers.steps.context import Run, Section

SUB = "deep_dive"
CSV, PNG = f"{SUB}/property_slices.csv", f"{SUB}/property_slices.png"
CAM_BATCH = 256          # CAMs requested per call: bounded memory on the engine's side
MAX_CAM_IMAGES = 6000    # more images of the tested classes than this: a seeded subsample gets CAM properties
MAX_CAM_BYTES = 256 << 20   # the CAM store keeps every map it computed: at 224x224 this allows ~1300 maps
COSTLY_CAM_IMAGES = 200     # run.costly_cams: 1,300 tail-path CAMs took ~150 s of a 2,000-image 224 px ViT-Ti run
N_PLOT_ROWS, N_PLOT_PROPS = 4, 3
ALPHA = 0.05
# Why CAM properties are reported apart from the image ones: an error's map explains the predicted (wrong) class
# and a correct image's map its true class, so a difference partly reflects how the two classes' maps differ.
CAM_CAVEAT = ("CAM properties are of the predicted class's map: for an error that is the wrong class's map, for "
              "a correct image the true class's, so they describe where the model looked, not the image.")


@dataclass(kw_only=True)
class PropertySlices(Section):
    title: str = "Which kinds of image go wrong"
    properties: pd.DataFrame        # per test image: index, label, pred, every property (CAM ones NaN if not computed)
    tests: pd.DataFrame             # per comparison x property: AUC, Cliff's delta, Mann-Whitney p, BH p, rate ratio
    quantiles: pd.DataFrame         # per comparison x property x quartile: range, images, errors, error rate
    findings: pd.DataFrame          # the top IMAGE property per comparison (rows of `tests`, plus `close`)
    cam_findings: pd.DataFrame      # the top CAM property per comparison (see CAM_CAVEAT)
    skipped: list[str] = field(default_factory=list)   # comparisons with too few errors, as sentences
    group: list[int] = field(default_factory=list)
    n_cam_images: int = 0           # images whose predicted-class CAM was measured
    property_names: list[str] = field(default_factory=list)
    seconds: float = 0.0            # time this step took (compare with Analysis.timings["inference"])


def _cam_columns(run: Run, idx: np.ndarray) -> pd.DataFrame:
    """CAM properties of the predicted class for images `idx`, requested in batches from the CAM store."""
    parts = []
    preds = run.preds.preds
    for s in range(0, len(idx), CAM_BATCH):
        part = idx[s:s + CAM_BATCH]
        parts.append(P.cam_properties(run.cams.get(part.tolist(), preds[part].tolist(), keep=False)))
    return pd.concat(parts, ignore_index=True) if parts else P.cam_properties(np.zeros((0, 1, 1)))


def _image_table(run: Run, comps: Sequence[P.Comparison], sec_notes: list[str]) -> tuple[pd.DataFrame, int]:
    pr, data = run.preds, run.data
    props = P.image_properties(data.images)
    if data.original_sizes is not None:   # image folders: the files' own sizes, before resizing
        props = pd.concat([props, P.source_properties(data.original_sizes)], axis=1)
    if "colourfulness" not in props:
        sec_notes.append("Colourfulness: not measured (grayscale images).")
    props.insert(0, "pred", pr.preds)
    props.insert(0, "label", pr.labels)
    props.insert(0, "index", np.arange(len(pr.labels)))
    for col in P.CAM_PROPERTIES:
        props[col] = np.nan
    if run.cams is None or not comps:
        if run.cams is None:
            sec_notes.append("CAM properties: not measured (no CAM store in this run).")
        return props, 0
    # Only the tested classes' images: a CAM for every test image would cost a second pass over the test set.
    idx = np.flatnonzero(np.isin(pr.labels, sorted({c.true for c in comps})))
    h, w = data.images.shape[1:3]
    cap = max(1, min(COSTLY_CAM_IMAGES if run.costly_cams else MAX_CAM_IMAGES, MAX_CAM_BYTES // (4 * h * w)))
    if len(idx) > cap:
        idx = np.sort(np.random.default_rng(run.params.SEED).choice(idx, cap, replace=False))
        sec_notes.append(f"CAM properties: a seeded sample of {cap} images of the tested classes (the rest: NaN).")
    with run.model_threads():   # where they are not from the pass, each CAM batch is a model pass
        cam = _cam_columns(run, idx)
    for col in P.CAM_PROPERTIES:
        props.loc[idx, col] = cam[col].to_numpy()
    return props, len(idx)


def _csv_table(tests: pd.DataFrame, quant: pd.DataFrame, skipped: list[str]) -> pd.DataFrame:
    """The tests with their quartile error rates as columns, and one row per skipped comparison."""
    table = tests.copy()
    if len(quant):
        wide = quant.pivot_table(index=["comparison", "property"], columns="quantile", values="error_rate")
        wide.columns = [f"error_rate_q{int(c)}" for c in wide.columns]
        table = table.merge(wide.reset_index(), on=["comparison", "property"], how="left")
    table["note"] = ""
    skip = pd.DataFrame({"comparison": [s.split(": skipped")[0] for s in skipped],
                         "note": [s.split(": ", 1)[1] if ": " in s else s for s in skipped]})
    return pd.concat([table, skip], ignore_index=True) if len(skip) else table


def _panels(sec: PropertySlices) -> list[SlicePanel]:
    """The top separating properties of the first comparisons tested, top pairs first."""
    t = sec.tests
    if not len(t):
        return []
    kinds = {"pair": 0, "class": 1, "group": 2}
    order = sorted(dict.fromkeys(t["comparison"]), key=lambda c: kinds[t.loc[t["comparison"] == c, "kind"].iloc[0]])
    props, panels = sec.properties, []
    labels, preds = props["label"].to_numpy(), props["pred"].to_numpy()
    for comp in order[:N_PLOT_ROWS]:
        rows = t[t["comparison"] == comp]
        rows = rows.reindex(rows["cliffs_delta"].abs().sort_values(ascending=False, kind="stable").index)
        image = rows[rows["property"].isin(P.TESTED_IMAGE_PROPERTIES)].head(N_PLOT_PROPS)
        for r in pd.concat([image, rows[rows["property"].isin(P.CAM_PROPERTIES)].head(1)]).itertuples():
            true, targets = int(r.true_id), [int(x) for x in r.pred_ids.split()]
            v = props[r.property].to_numpy(np.float64)
            err = (labels == true) & np.isin(preds, targets) & ~np.isnan(v)
            ok = (labels == true) & (preds == true) & ~np.isnan(v)
            panels.append(SlicePanel(row=comp, prop=r.property, errors=v[err], correct=v[ok],
                                     title=f"{r.property.replace('_', ' ')}: δ {r.cliffs_delta:+.2f}, "
                                           f"AUC {r.auc:.2f}, BH p {r.p_bh:.2g}"))
    return panels


def property_slices(run: Run, conf: Confusion, group_ids: Optional[Sequence[int]] = None) -> PropertySlices:
    """Test which image properties separate each top pair's errors (and each of those classes' errors overall,
    and the group members' errors into the group) from the correctly classified images of the true class."""
    start = time.perf_counter()
    group = [int(g) for g in (group_ids or [])]
    comps = P.comparisons(conf.pairs, group, run.data.num_classes)
    notes: list[str] = []
    props, n_cam = _image_table(run, comps, notes)
    columns = [c for c in (*P.TESTED_IMAGE_PROPERTIES, *P.CAM_PROPERTIES) if c in props and props[c].notna().any()]
    tests, quant, skipped = P.slice_tests(props, run.preds.labels, run.preds.preds, comps, run.names, columns)
    sec = PropertySlices(properties=props, tests=tests, quantiles=quant,
                         findings=P.top_findings(tests, P.TESTED_IMAGE_PROPERTIES),
                         cam_findings=P.top_findings(tests, P.CAM_PROPERTIES), skipped=skipped, group=group,
                         n_cam_images=n_cam, property_names=columns)
    sec.notes += notes + summary_lines(sec)
    run.outputs.save_csv(_csv_table(tests, quant, skipped), SUB, "property_slices.csv")
    fig = plot_property_slices(_panels(sec))
    sec.figures["property_slices"] = fig
    run.outputs.save_figure(fig, SUB, "property_slices.png")
    sec.files += [CSV, PNG]
    sec.seconds = time.perf_counter() - start
    return sec


def summary_lines(sec: PropertySlices) -> list[str]:
    """Plain-English lines for analysis_summary.txt."""
    n_comp = sec.tests["comparison"].nunique() if len(sec.tests) else 0
    lines = [f"Which kinds of image go wrong ({CSV}): {n_comp} comparisons (errors vs correct images of the true "
             f"class) over {len(sec.property_names)} properties, {len(sec.tests)} Mann-Whitney tests, "
             f"Benjamini-Hochberg corrected across all of them. CAM properties come from the predicted class's "
             f"CAM of the {sec.n_cam_images} images of the tested classes only."]
    if len(sec.findings):
        lines.append("  Top image property per comparison:")
        lines += ["    " + P.finding_sentence(row, ALPHA) for row in sec.findings.itertuples()]
    if len(sec.cam_findings):
        lines.append(f"  Top CAM property per comparison ({CAM_CAVEAT})")
        lines += ["    " + P.finding_sentence(row, ALPHA) for row in sec.cam_findings.itertuples()]
    if len(sec.skipped) > 5:   # a long list says little: the count and a few, the CSV has every one
        lines.append(f"  {len(sec.skipped)} comparisons skipped for too few errors or correct images, e.g. "
                     + "; ".join(sec.skipped[:3]) + f" (all in {CSV})")
    else:
        lines += ["  " + s for s in sec.skipped]
    return lines


def index_section(run: Run, sec: PropertySlices) -> str:
    """HTML fragment for index.html: the top finding per comparison and the figure."""
    esc = html.escape
    head = ("<tr><th>comparison</th><th>top image property</th><th>errors</th><th>Cliff's δ</th><th>AUC</th>"
            "<th>BH p</th><th>quartile rate ratio</th><th>close behind</th><th>top CAM property (δ)</th></tr>")
    cam = {r.comparison: f"{r.property.replace('_', ' ')} ({r.cliffs_delta:+.2f})"
           for r in sec.cam_findings.itertuples()}
    body = "".join(
        f"<tr><td>{esc(r.comparison)}</td><td>{esc(r.property.replace('_', ' '))}</td>"
        f"<td>{'lower' if r.cliffs_delta < 0 else 'higher'}</td><td>{r.cliffs_delta:+.2f}</td><td>{r.auc:.2f}</td>"
        f"<td>{r.p_bh:.2g}</td><td>{'∞' if not np.isfinite(r.rate_ratio) else f'{r.rate_ratio:.1f}×'}</td>"
        f"<td>{esc(r.close.replace('_', ' '))}</td><td>{esc(cam.get(r.comparison, ''))}</td></tr>"
        for r in sec.findings.itertuples())
    skipped = "".join(f"<li>{esc(s)}</li>" for s in sec.skipped)
    run.outputs.flush()   # the PNG is written in the background
    uri = preview_data_uri(run.outputs.current(PNG))
    img = f'<p><img src="{uri}" alt="property slices" style="max-width:100%"></p>' if uri else ""
    return (f"<h2>{esc(sec.title)}</h2><p>Per confused pair: which image properties separate the errors from the "
            f"correctly classified images of the true class (Benjamini–Hochberg corrected; "
            f'<a href="{esc(CSV)}">{esc(CSV)}</a>). {esc(CAM_CAVEAT)}</p><table>{head}{body}</table>'
            + (f"<ul>{skipped}</ul>" if skipped else "") + img)
