"""Before/after: did re-training help? `compare(a, b)` evaluates two checkpoints on the same test set.

Each model goes through its own `Analysis`, so its predictions come from its cache in OUTPUT_DIR/.cache
when an earlier run (or comparison) already computed them. The numbers are pure functions of the two
prediction arrays (helpers.compute.changes); the figures are drawn by helpers.plots. This module
runs both models, words the summary and writes OUTPUT_DIR/compare/:

    per_class_accuracy_delta.csv / .png   accuracy of every class under A and B, and B − A
    pair_changes.csv / .png               confused pairs that got better or worse (count under A and B)
    fixed_and_broken.csv                  every image A got wrong and B right (fixed), and the reverse (broken)
    fixed_examples.png, broken_examples.png   a sample of them, with both models' CAMs side by side
    compare_summary.txt                   accuracy, fixed/broken, ECE and within-superclass error share, A vs B
    index.html                            all of the above on one offline page
"""
from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd

from helpers.compute.changes import (change_summary, changed_images, fixed_and_broken, pair_changes,
                                     per_class_deltas)
from helpers.compute.metrics import HIGH_CONFIDENCE
from helpers.config import Params
from helpers.errors import ConfigError
from helpers.files import atomic
from helpers.files import png
from helpers.files.outputs import check_writable
from helpers.pipeline import Analysis

ModelSpec = Union[Analysis, Params, str, os.PathLike, None]
N_EXAMPLES = 8            # images per fixed/broken gallery
N_PAIRS_CHART = 10        # most improved and most worsened pairs drawn
# Which Params decide the test set: both models must agree on these to be compared.
DATA_FIELDS = ("DATASET", "DATA_ROOT", "LIMIT", "MEAN", "STD", "CONVERT_CHANNELS", "SUPERCLASS_MAP")

FILES = ["compare_summary.txt", "per_class_accuracy_delta.csv", "per_class_accuracy_delta.png",
         "pair_changes.csv", "pair_changes.png", "fixed_and_broken.csv", "fixed_examples.png",
         "broken_examples.png", "index.html"]
DESCRIPTIONS = {
    "compare_summary.txt": "Every number of the comparison: accuracy, fixed/broken images, ECE, within-superclass share.",
    "per_class_accuracy_delta.csv": "Per class: correct and accuracy under A and B, the change, images fixed and broken.",
    "per_class_accuracy_delta.png": "Change in accuracy of every class (B − A), sorted.",
    "pair_changes.csv": "Every confused pair whose count changed: count under A and B, better or worse.",
    "pair_changes.png": "The confused pairs that improved and worsened most.",
    "fixed_and_broken.csv": "Every image A got wrong and B right (fixed), and the reverse (broken).",
    "fixed_examples.png": "Fixed images: CAMs of A and B for the true class, and A's CAM for its wrong prediction.",
    "broken_examples.png": "Broken images: CAMs of A and B for the true class, and B's CAM for its wrong prediction.",
}


def _pct(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.2%}"


def _pp(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x * 100:+.2f} pp"


def summary_text(s: dict, name_a: str, name_b: str, per_class: pd.DataFrame, pairs: pd.DataFrame) -> str:
    """compare_summary.txt: every number of the comparison, B − A throughout."""
    verdict = ("could well be noise at this test-set size" if s["mcnemar_p"] >= 0.05
               else "unlikely to be noise (p < 0.05)")
    moved = per_class[per_class["support"] > 0]
    lines = [
        "Comparison of two checkpoints on the same test set", "",
        f"A: {name_a}", f"B: {name_b}", f"Test images: {s['n_images']}", "",
        f"Accuracy: A {_pct(s['accuracy_a'])}, B {_pct(s['accuracy_b'])} (B − A {_pp(s['accuracy_delta'])})",
        f"Images fixed (A wrong → B right): {s['n_fixed']}; broken (A right → B wrong): {s['n_broken']}; "
        f"net {s['n_fixed'] - s['n_broken']:+d}",
        f"McNemar exact test on fixed vs broken: p = {s['mcnemar_p']:.3g}, the change {verdict}",
        f"Wrong under both: {s['n_both_wrong']} ({s['n_both_wrong_changed']} with a different wrong prediction)",
        f"Expected calibration error (15 bins): A {s['ece_a']:.4f}, B {s['ece_b']:.4f} "
        f"(B − A {s['ece_delta']:+.4f}; lower is better calibrated)",
        f"High-confidence errors (confidence ≥ {HIGH_CONFIDENCE}): A {s['high_conf_errors_a']}, B {s['high_conf_errors_b']} "
        f"(B − A {s['high_conf_errors_delta']:+d})",
    ]
    if "superclass_share_a" in s:
        lines.append(
            f"Errors within the true class's superclass: A {_pct(s['superclass_share_a'])} "
            f"({s['n_within_a']}/{s['n_errors_a']}), B {_pct(s['superclass_share_b'])} "
            f"({s['n_within_b']}/{s['n_errors_b']}); B − A {_pp(s['superclass_share_delta'])} "
            f"(chance level {_pct(s['superclass_chance'])})")
    lines += ["", f"Classes: {int((moved['delta'] > 0).sum())} improved, {int((moved['delta'] < 0).sum())} got worse, "
              f"{int((moved['delta'] == 0).sum())} unchanged"]
    for title, rows in (("Most improved classes", moved.sort_values(["delta", "class_id"], ascending=[False, True])),
                        ("Most worsened classes", moved.sort_values(["delta", "class_id"], ascending=[True, True]))):
        rows = rows[rows["delta"] > 0] if title.startswith("Most improved") else rows[rows["delta"] < 0]
        lines += ["", f"{title}:"] + [
            f"  {r.class_name}: {r.accuracy_a:.1%} → {r.accuracy_b:.1%} ({_pp(r.delta)}; fixed {r.fixed}, broken {r.broken})"
            for r in rows.head(10).itertuples()] + ([] if len(rows) else ["  none"])
    better, worse = pairs[pairs["change"] == "better"], pairs[pairs["change"] == "worse"]
    lines += ["", f"Confused pairs: {len(better)} fewer errors under B, {len(worse)} more"]
    for title, rows in (("Pairs that got better", better), ("Pairs that got worse", worse)):
        lines += ["", f"{title}:"] + [
            f"  {r.true_name} → {r.pred_name}: {r.count_a} → {r.count_b} ({r.delta:+d})"
            + (" [same superclass]" if r.same_superclass == "yes" else "")
            for r in rows.head(10).itertuples()] + ([] if len(rows) else ["  none"])
    return "\n".join(lines) + "\n"


def index_html(s: dict, name_a: str, name_b: str, per_class: pd.DataFrame, pairs: pd.DataFrame) -> str:
    """compare/index.html: the headline numbers, both charts, both galleries and a link to every file."""
    e = html.escape
    head = [f"<li><b>Accuracy</b>: A {_pct(s['accuracy_a'])} → B {_pct(s['accuracy_b'])} ({_pp(s['accuracy_delta'])})</li>",
            f"<li><b>Fixed</b> {s['n_fixed']} · <b>broken</b> {s['n_broken']} · net {s['n_fixed'] - s['n_broken']:+d} "
            f"(McNemar p = {s['mcnemar_p']:.3g})</li>",
            f"<li><b>ECE</b>: {s['ece_a']:.4f} → {s['ece_b']:.4f} ({s['ece_delta']:+.4f})</li>"]
    if "superclass_share_a" in s:
        head.append(f"<li><b>Errors within the superclass</b>: {_pct(s['superclass_share_a'])} → "
                    f"{_pct(s['superclass_share_b'])} ({_pp(s['superclass_share_delta'])})</li>")
    top = pairs.head(15)
    pair_rows = "".join(f"<tr><td>{e(r.true_name)} → {e(r.pred_name)}</td><td>{r.count_a}</td><td>{r.count_b}</td>"
                        f"<td>{r.delta:+d}</td><td>{e(r.change)}</td></tr>" for r in top.itertuples())
    links = "".join(f'<tr><td><a href="{e(f)}">{e(f)}</a></td><td>{e(DESCRIPTIONS.get(f, ""))}</td></tr>'
                    for f in FILES if f != "index.html")
    figs = "".join(f'<h2>{e(t)}</h2><p><img src="{f}" alt="{e(t)}"></p>' for t, f in (
        ("Per-class accuracy change", "per_class_accuracy_delta.png"), ("Confused pairs: better and worse", "pair_changes.png"),
        ("Fixed images (A wrong → B right)", "fixed_examples.png"), ("Broken images (A right → B wrong)", "broken_examples.png")))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Checkpoint comparison</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}img{{max-width:100%;border:1px solid #ccc}}
table{{border-collapse:collapse}}td,th{{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left}}</style></head>
<body><h1>Checkpoint comparison</h1><p>A: {e(name_a)}<br>B: {e(name_b)}<br>{s['n_images']} test images, the same for both.</p>
<ul>{''.join(head)}</ul>
<h2>Pairs that changed most</h2><table><tr><th>true → predicted</th><th>A</th><th>B</th><th>B − A</th><th></th></tr>{pair_rows}</table>
{figs}
<h2>Every file</h2><table>{links}</table>
<p><a href="../index.html">Back to the analysis of A</a></p>
</body></html>
"""


# ---------------------------------------------------------------------------------------------- models
def _model_name(an: Analysis) -> str:
    p, arch = an.params.MODEL_PATH, an.loaded.arch
    if ":" in arch and not arch.startswith(("timm:", "torchvision:")):   # path/to/model.py:Class -> model.py:Class
        file, cls = arch.rsplit(":", 1)
        arch = f"{Path(file).name}:{cls}"
    return f"{Path(p).name} ({arch})" if p else f"default model ({arch})"


def as_analysis(spec: ModelSpec, base: Optional[Params] = None, progress: bool = True) -> Analysis:
    """An Analysis for one side: an existing Analysis as is, Params as given, or a checkpoint path
    (None: the default model) with every other parameter from `base`."""
    if isinstance(spec, Analysis):
        return spec
    if isinstance(spec, Params):
        return Analysis(spec, progress=progress)
    if spec is None or isinstance(spec, (str, os.PathLike)):
        base = base or Params().with_env(os.environ)
        return Analysis(base, progress=progress, MODEL_PATH=None if spec is None else str(spec))
    raise ConfigError(f"compare() takes an Analysis, Params or a checkpoint path for each model; got {type(spec).__name__}.")


def _same_data_params(a: Params, b: Params) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in DATA_FIELDS)


def _ready(an: Analysis, data_from: Optional[Analysis] = None) -> Analysis:
    """Model, data and predictions loaded; the test set is shared with `data_from` when both ask for the same."""
    if an.data is None and data_from is not None and _same_data_params(an.params, data_from.params):
        an.data, an.inputs = data_from.data, data_from.inputs
    if an.data is None:
        an.load_data()
    if an.loaded is None:
        an.load_model()   # checks the model against the data
    if an.preds is None:
        an.predict()      # from the model's own cache when an earlier run computed it
    return an


def check_same_data(a: Analysis, b: Analysis) -> None:
    if (a.data.fingerprint != b.data.fingerprint or len(a.data.labels) != len(b.data.labels)
            or not np.array_equal(a.data.labels, b.data.labels) or a.data.class_names != b.data.class_names):
        raise ConfigError(
            f"The two models were evaluated on different test sets (A: {a.data.name}, {len(a.data.labels)} images, "
            f"fingerprint {a.data.fingerprint}; B: {b.data.name}, {len(b.data.labels)} images, fingerprint "
            f"{b.data.fingerprint}). A comparison needs the same images: give both the same "
            f"{', '.join(DATA_FIELDS)}.")


# ---------------------------------------------------------------------------------------------- result
@dataclass
class Comparison:
    out: Path
    name_a: str
    name_b: str
    summary: dict
    per_class: pd.DataFrame
    pairs: pd.DataFrame
    fixed: np.ndarray          # image indices, A wrong → B right (A's most confident mistakes first)
    broken: np.ndarray         # image indices, A right → B wrong (B's most confident mistakes first)
    samples: dict = field(default_factory=dict)   # "fixed"/"broken" -> the indices drawn in the galleries
    files: list = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    text: str = ""

    def show(self) -> None:
        from helpers.steps.context import show_inline
        print(self.text)
        for fig in self.figures.values():
            show_inline(fig)
        print(f"Open {(self.out / 'index.html').resolve()} for every file.")


def _gallery(a: Analysis, b: Analysis, idx: np.ndarray, kind: str, name_a: str, name_b: str, total: int):
    """Rows: the image, A's and B's CAM for the true class, and the wrong model's CAM for its prediction."""
    from helpers.plots.gallery import GalleryRow, render_gallery
    names, labels = a.names, a.preds.labels
    idx = [int(i) for i in idx]
    wrong_an, wrong_tag = (a, "A") if kind == "fixed" else (b, "B")
    wrong_pred = [int(wrong_an.preds.preds[i]) for i in idx]
    cam_a = a.cams.get(idx, [int(labels[i]) for i in idx])        # one batch per model and class set
    cam_b = b.cams.get(idx, [int(labels[i]) for i in idx])
    cam_w = wrong_an.cams.get(idx, wrong_pred)
    over_a, over_b, over_w = a.run.overlays(idx, cam_a), b.run.overlays(idx, cam_b), wrong_an.run.overlays(idx, cam_w)
    rows = []
    for k, i in enumerate(idx):
        t, pa, pb = int(labels[i]), int(a.preds.preds[i]), int(b.preds.preds[i])
        title = (f"#{i} · true: {names[t]} · A: {names[pa]} ({a.preds.probs[i, pa]:.2f}) → "
                 f"B: {names[pb]} ({b.preds.probs[i, pb]:.2f})")
        panels = [(f"A: CAM → true: {names[t]}", over_a[k]), (f"B: CAM → true: {names[t]}", over_b[k]),
                  (f"{wrong_tag}: CAM → pred: {names[wrong_pred[k]]}", over_w[k])]
        rows.append(GalleryRow(image=a.data.images[i], title=title, panels=panels, ok=kind == "fixed"))
    what = "fixed: A wrong → B right" if kind == "fixed" else "broken: A right → B wrong"
    return render_gallery(f"{total} images {what}", [(f"{len(rows)} of {total}, most confident mistakes first", rows)],
                          subtitle=f"A = {name_a} · B = {name_b}")


def compare(a: ModelSpec, b: ModelSpec, params: Optional[Params] = None, output_dir=None,
            n_examples: int = N_EXAMPLES, progress: bool = True) -> Comparison:
    """Compare two models on the same test set and write OUTPUT_DIR/compare/.

    `a` and `b` are each an Analysis (as the notebook has), Params, or a checkpoint path (str/Path; None
    for the default model) whose other parameters come from `params` (default: `a`'s parameters when `a`
    is an Analysis or Params). Each model's predictions come from its own cache when present.
    `output_dir` defaults to A's OUTPUT_DIR/compare."""
    from helpers.plots import figures as plots
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 0:
        raise ConfigError(f"n_examples must be a non-negative integer (got {n_examples!r}).")
    base = params or (a.params if isinstance(a, Analysis) else a if isinstance(a, Params) else None)
    an_a = _ready(as_analysis(a, base, progress))
    an_b = _ready(as_analysis(b, base or an_a.params, progress), data_from=an_a)
    check_same_data(an_a, an_b)
    out = Path(output_dir) if output_dir is not None else an_a.out / "compare"
    if output_dir is None:
        check_writable(an_a.out, ["compare"])   # compare/ inside OUTPUT_DIR: never through a file or a link
    check_writable(out)

    data, pa, pb = an_a.data, an_a.preds, an_b.preds
    labels = pa.labels
    name_a, name_b = _model_name(an_a), _model_name(an_b)
    per_class = per_class_deltas(labels, pa.preds, pb.preds, data.class_names, data.fine_to_coarse, data.coarse_names)
    pairs = pair_changes(labels, pa.preds, pb.preds, data.class_names, data.fine_to_coarse)
    fixed, broken = fixed_and_broken(labels, pa.preds, pb.preds, pa.probs, pb.probs)
    summary = change_summary(labels, pa.preds, pb.preds, pa.probs, pb.probs, data.fine_to_coarse)
    text = summary_text(summary, name_a, name_b, per_class, pairs)

    images = changed_images(labels, pa.preds, pb.preds, pa.probs, pb.probs, fixed, broken, data.display_names)

    res = Comparison(out=out, name_a=name_a, name_b=name_b, summary=summary, per_class=per_class, pairs=pairs,
                     fixed=fixed, broken=broken, text=text)
    atomic.write_text(out / "compare_summary.txt", text)
    atomic.save_csv(per_class, out / "per_class_accuracy_delta.csv")
    atomic.save_csv(pairs, out / "pair_changes.csv")
    atomic.save_csv(images, out / "fixed_and_broken.csv")
    res.figures["per_class_accuracy_delta"] = plots.plot_accuracy_deltas(per_class, name_a, name_b)
    res.figures["pair_changes"] = plots.plot_pair_changes(pairs, k=N_PAIRS_CHART)
    for name, fig in list(res.figures.items()):
        png.save_figure(fig, out / f"{name}.png", dpi=100, bbox_inches="tight")
    for kind, idx in (("fixed", fixed), ("broken", broken)):
        res.samples[kind] = idx[:n_examples]
        img = _gallery(an_a, an_b, res.samples[kind], kind, name_a, name_b, len(idx))
        png.save_png(img, out / f"{kind}_examples.png")
        res.figures[f"{kind}_examples"] = img
    atomic.write_text(out / "index.html", index_html(summary, name_a, name_b, per_class, pairs))
    # Keep each side's CAMs (and A's memo) in its cache, so the next comparison or widget reuses them.
    for an in (an_a, an_b):
        an.save_cam_cache()
    res.files = list(FILES)
    return res
