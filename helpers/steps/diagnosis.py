"""Why these classes are confused: for every top pair and for the group, the candidate causes measured by the
data half (wrong labels, training data, property slices) and the model half (concepts, CAM trust, ambiguity),
ranked by the share of the pair's errors each accounts for (compute/diagnosis.py says how each is counted).
Writes deep_dive/diagnosis.csv; the report puts it first in analysis_summary.txt and index.html, and
recommendations.txt is derived from it."""
from __future__ import annotations

import dataclasses
import html
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from helpers.compute import diagnosis as D
from helpers.compute import properties as P
from helpers.steps.confusion import Confusion
from helpers.steps.context import Run, Section

SUB, CSV = "deep_dive", "diagnosis.csv"
MAX_CAM_IMAGES = 200      # per pair: errors, and correctly classified B images, whose B-CAM border is measured
COSTLY_CAM_IMAGES = 60    # ... where each CAM costs a model pass (run.costly_cams)
MAX_PROBE_IMAGES = 2000   # per pair: images of the two classes the separability probe is fitted on
CSV_COLUMNS = ["pair", "true_id", "pred_ids", "n_errors", "rank", "cause", "share", "errors_explained", "evidence",
               "figure", "approximate", "images"]


@dataclass(kw_only=True)
class Diagnosis(Section):
    title: str = "Why these classes are confused"
    pairs: list[D.PairDiagnosis] = field(default_factory=list)   # top pairs in order, then the group
    table: pd.DataFrame = field(default_factory=pd.DataFrame)    # CSV_COLUMNS, one row per named cause
    cam_warning: str = ""                                        # CAM-based causes were marked approximate: why

    def of(self, true_id: int, pred_id: int) -> Optional[D.PairDiagnosis]:
        """The diagnosis of pair A → B, when it was diagnosed."""
        for d in self.pairs:
            if d.true_id == true_id and d.pred_ids == (pred_id,):
                return d
        return None


def _pair_label(names: Sequence[str], t: int, preds: Sequence[int], group: bool = False) -> str:
    return P.Comparison("group" if group else "pair", t, tuple(preds)).label(names)


def _property_cause(run: Run, props: Any, comp: str) -> list[Optional[D.Cause]]:
    """kind_of_image: the comparison's top image property."""
    if props is None or not len(props.tests):
        return []
    tests = props.tests[props.tests["comparison"] == comp].set_index("property")
    quant = props.quantiles[props.quantiles["comparison"] == comp]
    fig = "deep_dive/property_slices.png"
    out: list[Optional[D.Cause]] = []
    image = props.findings[props.findings["comparison"] == comp]
    if len(image) and str(image.iloc[0]["property"]) in tests.index:
        prop = str(image.iloc[0]["property"])
        out.append(D.property_cause(_row(tests, prop), quant[quant["property"] == prop],
                                    P.QUANTILE_WORDS.get(prop, ("lowest", "highest")), figure=fig))
    return out


def _sample(idx: np.ndarray, cap: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(idx, cap, replace=False)) if len(idx) > cap else idx


def _context_cause(run: Run, t: int, q: int, errors: np.ndarray, cam_untrusted: str) -> Optional[D.Cause]:
    """B's CAM border share on the errors against on correctly classified B images."""
    if run.cams is None:
        return None
    pr, seed = run.preds, run.params.SEED
    cap = COSTLY_CAM_IMAGES if run.costly_cams else MAX_CAM_IMAGES
    err = _sample(errors, cap, seed)
    ref = _sample(np.flatnonzero((pr.labels == q) & (pr.preds == q)), cap, seed)
    if not len(err) or not len(ref):
        return None
    with run.model_threads():
        border = [P.cam_properties(run.cams.get(i.tolist(), [q] * len(i)))["cam_border_share"].to_numpy()
                  for i in (err, ref)]
    return D.context_cause(border[0], border[1], "deep_dive/property_slices.png", approximate=bool(cam_untrusted),
                           n_total=len(errors))


def _concept_row(concepts: Any, t: int, q: int) -> Optional[pd.Series]:
    pairs = getattr(concepts, "pairs", None)
    if pairs is None or not len(pairs):
        return None
    row = pairs[(pairs["true_id"] == t) & (pairs["pred_id"] == q)]
    return row.iloc[0] if len(row) else None


def _concept_cause(concepts: Any, t: int, q: int) -> Optional[D.Cause]:
    """A concept that carries the pair's margin and is as strong in B's own images."""
    row = _concept_row(concepts, t, q)
    if row is None or concepts.margins is None:
        return None
    m = concepts.margins
    err = m[(m["true_id"] == t) & (m["pred_id"] == q) & (m["role"] == "error")]
    cols = [f"c{k}" for k in range(1, concepts.k + 1)]
    per_error_top = err[cols].to_numpy().argmax(axis=1) + 1 if len(err) else np.zeros(0, int)
    # no correct A images to compare with: the gap, which the cause needs, is unknown (NaN: not named)
    return D.concept_cause(int(row["top_concept"]), per_error_top, float(row["strength_in_pred_class"]),
                           float(row["top_gap_share"]), bool(row["exact"]), "deep_dive/concepts.png")


def _corner_concept(concepts: Any, t: int, q: int) -> str:
    """'concept k, ...' when the concept that pushes the pair's errors most peaks in a corner cell of the
    feature map in most of its top patches (an object's own parts do not)."""
    row = _concept_row(concepts, t, q)
    if row is None:
        return ""
    k = int(row["top_concept"])
    boxes = concepts.patches.get(k, [])
    corner = sum(b.in_corner for b in boxes)
    if not boxes or corner * 2 <= len(boxes):
        return ""
    return (f"concept {k}, the largest push towards B, has {corner} of its {len(boxes)} top patches in an image "
            f"corner (deep_dive/concepts.png)")


def _pair_separability(run: Run, t: int, q: int) -> Optional[float]:
    """Cross-validated linear accuracy on the features of the images labelled A or B."""
    pr = run.preds
    if pr.features is None:
        return None
    idx = _sample(np.flatnonzero(np.isin(pr.labels, [t, q])), MAX_PROBE_IMAGES, run.params.SEED)
    acc = run.cache.cached("diagnosis_probe", lambda: D.probe_accuracy(pr.features[idx], pr.labels[idx],
                                                                        seed=run.params.SEED), idx, t, q)
    return float(acc)


def _row(tests: pd.DataFrame, prop: str) -> pd.Series:
    row = tests.loc[prop].copy()
    row["property"] = prop
    return row


def _train_cause(train: Any, comp: str, errors: np.ndarray, preds: Sequence[int]) -> Optional[D.Cause]:
    """Errors with a confirmed near-duplicate in the training set labelled as the predicted class there."""
    if train is None:
        return None
    dups = train.near_duplicates
    n = 0
    if len(dups) and {"test_index", "train_label"} <= set(dups):
        hit = dups["test_index"].isin(errors) & dups["train_label"].isin(list(preds))
        n = int(dups.loc[hit, "test_index"].nunique())
    return D.training_cause(n, len(errors), int(train.ambiguous.get(comp, 0)), figure="deep_dive/near_duplicates.png")


def diagnose_pair(run: Run, t: int, preds: Sequence[int], data: Any = None, deep: Any = None,
                  concepts: Any = None, trust: Any = None, group: bool = False) -> D.PairDiagnosis:
    """Every candidate cause of A's errors into `preds`, ranked."""
    pr, names = run.preds, run.names
    comp = _pair_label(names, t, preds, group)
    errors = np.flatnonzero((pr.labels == t) & np.isin(pr.preds, list(preds)))
    diag = D.PairDiagnosis(comp, int(t), tuple(int(q) for q in preds), int(len(errors)))
    if not len(errors):
        return diag
    causes: list[Optional[D.Cause]] = []
    labels = getattr(data, "labels", None)
    if labels is not None and labels.wrong is not None:
        p_given = pr.probs[np.arange(len(pr.labels)), pr.labels]
        causes.append(D.wrong_label_cause(errors, labels.wrong, labels.validated, p_given,
                                          "deep_dive/label_errors.csv"))
    cam_untrusted = getattr(trust, "untrusted_reason", "") if trust is not None else ""
    causes += _property_cause(run, getattr(data, "properties", None), comp)
    causes.append(_train_cause(getattr(data, "train", None), comp, errors, preds))
    if len(preds) == 1:
        q = int(preds[0])
        context = _context_cause(run, t, q, errors, cam_untrusted)
        corner = _corner_concept(concepts, t, q)
        if context is not None and corner:
            context = dataclasses.replace(context, evidence=f"{context.evidence}; {corner}")
        causes.append(context)
        causes.append(_concept_cause(concepts, t, q))
        p_true = pr.probs[errors, t]
        p_pred = pr.probs[errors, q]
        causes.append(D.ambiguity_cause(p_true, p_pred, _pair_separability(run, t, q)))
    train = getattr(data, "train", None)
    if train is not None and train.class_counts is not None:
        k = run.data.num_classes
        support = np.bincount(pr.labels, minlength=k)
        wrong = np.bincount(pr.labels, weights=pr.preds != pr.labels, minlength=k)
        rates = np.where(support > 0, wrong / np.maximum(support, 1), np.nan)   # no test images: no rate
        causes.append(D.few_images_cause(train.class_counts, t, rates, len(errors)))
    named, short = D.rank(causes)
    diag.causes = named
    diag.considered = [f"{c.name}: {c.share:.0%} ({c.evidence})" for c in short]
    return diag


def diagnosis(run: Run, conf: Confusion, data: Any = None, deep: Any = None, model: Any = None) -> Diagnosis:
    """The diagnosis of every top pair (conf.pairs) and of each member of the deep-dive group. `data` and
    `model`: the "Is it the data?" and "Is it the model?" results, when they ran."""
    concepts = getattr(model, "concepts", None)
    trust = getattr(model, "trust", None)
    sec = Diagnosis()
    for t, q in zip(conf.pairs["true_id"].astype(int), conf.pairs["pred_id"].astype(int)):
        sec.pairs.append(diagnose_pair(run, t, (q,), data, deep, concepts, trust))
    group = list(deep.group.group) if deep is not None else []
    for t in group:
        others = [g for g in group if g != t]
        if others:
            sec.pairs.append(diagnose_pair(run, t, others, data, deep, concepts, trust, group=True))
    if trust is not None and trust.untrusted_reason:
        sec.cam_warning = (f"CAM-based causes (context) are marked approximate: {trust.untrusted_reason} "
                           f"(deep_dive/cam_trust.csv).")
    sec.table = table(sec.pairs)
    run.outputs.save_csv(sec.table, SUB, CSV)
    sec.files.append(f"{SUB}/{CSV}")
    sec.notes += summary_lines(sec)
    return sec


def table(pairs: Sequence[D.PairDiagnosis]) -> pd.DataFrame:
    rows = []
    for d in pairs:
        base = dict(pair=d.pair, true_id=d.true_id, pred_ids=" ".join(map(str, d.pred_ids)), n_errors=d.n_errors)
        if not d.causes:
            rows.append(dict(base, rank=0, cause=D.NO_CLEAR_CAUSE, share=np.nan, errors_explained=0,
                             evidence="; ".join(d.considered), figure="", approximate=False, images=""))
        for k, c in enumerate(d.causes, start=1):
            rows.append(dict(base, rank=k, cause=c.kind, share=round(c.share, 4), errors_explained=c.n_errors,
                             evidence=c.evidence, figure=c.figure, approximate=c.approximate,
                             images=" ".join(map(str, c.images))))
    return pd.DataFrame(rows, columns=CSV_COLUMNS)


def pair_sentence(d: D.PairDiagnosis, top: int = 3) -> str:
    """'Shirt → T-shirt/top (85 errors): 1. wrong test labels, 41% (…); 2. …' or '… no clear cause (…)'."""
    head = f"{d.pair} ({d.n_errors} errors): "
    if not d.n_errors:
        return head + "no errors to explain."
    if not d.causes:
        return (head + D.NO_CLEAR_CAUSE + f" (no measured cause accounts for {D.MIN_SHARE:.0%} and "
                f"{D.MIN_ERRORS} of these errors).")
    parts = [f"{k}. {c.name}, {c.share:.0%}{' (approximate)' if c.approximate else ''}: {c.evidence}"
             for k, c in enumerate(d.causes[:top], start=1)]
    return head + "; ".join(parts) + "."


def summary_lines(sec: Diagnosis) -> list[str]:
    lines = ["WHY THESE CLASSES ARE CONFUSED", "-" * 60,
             "Each pair's candidate causes, ranked by the share of its errors they account for "
             "(deep_dive/diagnosis.csv):"]
    lines += ["  " + pair_sentence(d) for d in sec.pairs]
    if sec.cam_warning:
        lines.append("  " + sec.cam_warning)
    return lines


def index_section(run: Run, sec: Diagnosis) -> str:
    esc = html.escape
    rows = []
    for d in sec.pairs:
        if d.causes:
            causes = "<ol>" + "".join(
                f"<li><b>{esc(c.name)}</b> {c.share:.0%}{' <i>(approximate)</i>' if c.approximate else ''}: "
                f"{esc(c.evidence)}"
                + (f' (<a href="{esc(c.figure)}">{esc(c.figure.split("/")[-1])}</a>)' if c.figure else "")
                + "</li>" for c in d.causes) + "</ol>"
        else:
            causes = f"<p>{D.NO_CLEAR_CAUSE}</p>"
        rows.append(f"<tr><td>{esc(d.pair)}</td><td>{d.n_errors}</td><td>{causes}</td></tr>")
    warn = f'<p class="note">{esc(sec.cam_warning)}</p>' if sec.cam_warning else ""
    return ('<p>Each pair\'s candidate causes, ranked by the share of its errors they account for '
            '(<a href="deep_dive/diagnosis.csv">diagnosis.csv</a>).</p>' + warn
            + "<table><tr><th>pair</th><th>errors</th><th>causes</th></tr>" + "".join(rows) + "</table>")
