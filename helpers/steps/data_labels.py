"""Wrong test labels, per confused pair: how many of a pair's errors are test images whose label people judged
wrong (cleanlab/label-errors for CIFAR-10/100), and for how many the workers chose the model's answer; the
accuracy on the corrected labels beside the official one. Datasets without human validation get an unvalidated
estimate from the model's own probabilities (confident learning), said so wherever it is shown.

Writes deep_dive/label_errors.csv: one table, its `scope` column telling the rows apart ("pair": one confused
pair; "group": all errors inside the deep-dive group; "class": one class, with the corrected accuracy).
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from helpers.compute import label_errors as le
from helpers.compute import metrics
from helpers.compute.deep_dive import cleanlab_label_issues
from helpers.data.label_errors import order_mismatch, resolve_label_errors
from helpers.steps.confusion import Confusion
from helpers.steps.context import Run, Section

SUB = "deep_dive"
CSV = "label_errors.csv"
SUMMARY_PAIRS = 5      # pairs named in analysis_summary.txt
HUMAN = "human validation (cleanlab/label-errors: 5 Mechanical Turk workers per checked test image)"
ESTIMATE = ("unvalidated estimate: confident learning on the model's own test probabilities (no person checked "
            "these labels)")


@dataclass(kw_only=True)
class LabelEvidence(Section):
    title: str = "Wrong test labels"
    validated: bool                       # True: people checked the labels; False: the model's own estimate
    source: str                           # where the evidence came from, in words
    pairs: pd.DataFrame                   # le.PAIR_COLUMNS: one row per confused pair (+ one "group" row)
    classes: pd.DataFrame                 # le.CLASS_COLUMNS: one row per class
    n_images: int                         # images analysed
    n_checked: int                        # of them, checked by people (0 without validation)
    n_wrong: int                          # wrong labels: validated, or estimated when not validated
    n_correctable: int                    # wrong labels with a known right one (validated only)
    n_excluded: int                       # wrong labels without one, left out of the corrected accuracy
    accuracy: float                       # on the official labels
    accuracy_corrected: Optional[float]   # on the corrected labels (validated only: never the model's own guess)
    n_in_sample_suspects: int             # metrics.label_suspect_mask, as the deep dive's label suspects
    cleanlab_issues: Optional[int] = None  # cleanlab.find_label_issues (unvalidated only; None: not installed)
    wrong: Optional[np.ndarray] = None      # (N,) bool per test image: validated wrong label, or estimated one
    suggested: Optional[np.ndarray] = None  # (N,) int: the right label (workers', or the estimate's), -1 unknown


def _evidence(run: Run) -> tuple[Optional[tuple[np.ndarray, np.ndarray, int]], list[str]]:
    """((wrong, suggested, n_checked) from people, or None; notes)."""
    p, labels = run.params, run.preds.labels
    human, note = resolve_label_errors(p.LABEL_ERRORS, run.data.name, p.DATA_ROOT, p.DOWNLOAD)
    notes = [note]
    if human is None:
        return None, notes
    why = order_mismatch(labels, human)
    if why is not None:
        # The JSON names images by their index in the official test set: any other order would pin the
        # workers' verdicts on the wrong images.
        notes.append(f"Human label validation not used: {why}. It applies only to the official test set in its "
                     f"official order (a LIMIT keeping the first images is fine).")
        return None, notes
    wrong, suggested = le.align(len(labels), human.index, human.is_wrong, human.is_correctable, human.guessed)
    return (wrong, suggested, int((human.index < len(labels)).sum())), notes


def label_evidence(run: Run, conf: Confusion, group_ids: Optional[Sequence[int]] = None) -> LabelEvidence:
    """Label evidence for every pair of conf.pairs (and the deep-dive group when given); writes
    deep_dive/label_errors.csv."""
    pr, names = run.preds, run.data.class_names
    found, notes = _evidence(run)
    in_sample = int(metrics.label_suspect_mask(pr.labels, pr.probs).sum())
    cleanlab = None
    if found is not None:
        wrong, suggested, checked = found
    else:
        wrong, suggested = le.confident_learning_mask(pr.labels, pr.probs)
        checked = 0
        issues = run.cache.cached("cleanlab", lambda: cleanlab_label_issues(pr.labels, pr.probs))
        cleanlab = None if issues is None else int(len(issues))
    validated = found is not None
    pairs = le.pair_table(pr.labels, pr.preds, wrong, suggested, conf.pairs, names, group_ids)
    classes = le.class_table(pr.labels, pr.preds, wrong, suggested, names)
    official, corrected = le.accuracies(pr.labels, pr.preds, wrong, suggested)
    if not validated:
        # Relabelling with the model's own guess would only tell how often the model agrees with itself.
        classes[["correctable", "excluded", "images_corrected", "accuracy_corrected"]] = np.nan
        corrected = None
    _, keep = le.corrected_labels(pr.labels, wrong, suggested)
    sec = LabelEvidence(
        validated=validated, source=HUMAN if validated else ESTIMATE, pairs=pairs, classes=classes,
        n_images=int(len(pr.labels)), n_checked=checked, n_wrong=int(wrong.sum()),
        n_correctable=int((wrong & (suggested >= 0)).sum()) if validated else 0,
        n_excluded=int((~keep).sum()) if validated else 0, accuracy=official, accuracy_corrected=corrected,
        n_in_sample_suspects=in_sample, cleanlab_issues=cleanlab, wrong=np.asarray(wrong, bool),
        suggested=np.asarray(suggested, np.int64))
    run.outputs.save_csv(csv_table(pairs, classes), SUB, CSV)
    sec.files.append(f"{SUB}/{CSV}")
    sec.notes += notes + summary_lines(sec)
    return sec


def csv_table(pairs: pd.DataFrame, classes: pd.DataFrame) -> pd.DataFrame:
    """The pair and class rows in one table: counts and ids stay integers (nullable, blank where a row has
    none) rather than the floats a plain concat would give them."""
    table = pd.concat([pairs, classes], ignore_index=True)
    for col in table.columns:
        values = table[col].dropna()
        if col != "share_wrong" and not col.startswith("accuracy") and pd.api.types.is_numeric_dtype(table[col]) \
                and len(values) and (values == values.round()).all():
            table[col] = table[col].astype("Int64")
    return table


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.1%}"


def summary_lines(sec: LabelEvidence) -> list[str]:
    """Plain-English lines for analysis_summary.txt."""
    if sec.validated:
        lines = [f"Wrong test labels ({sec.source}): {sec.n_wrong} of {sec.n_images} test images have a label the "
                 f"workers rejected ({sec.n_correctable} with the right label agreed, {sec.n_excluded} without one). "
                 f"Accuracy {_pct(sec.accuracy)} on the official labels, {_pct(sec.accuracy_corrected)} on the "
                 f"corrected ones (images without an agreed label left out)."]
        what, who = "human-validated wrong labels", "the workers chose the model's answer for"
    else:
        cl = "" if sec.cleanlab_issues is None else f"; cleanlab flags {sec.cleanlab_issues}"
        lines = [f"Wrong test labels, {sec.source}: {sec.n_wrong} of {sec.n_images} test images suspected "
                 f"({sec.n_in_sample_suspects} with p(given) < {metrics.LABEL_SUSPECT_MAX_P_GIVEN} while the model "
                 f"is ≥ {metrics.HIGH_CONFIDENCE:.0%} sure of another class{cl}). Estimates, not verdicts: check "
                 f"the images before trusting them."]
        what, who = "suspected wrong labels (unvalidated)", "the suspected right label is the model's answer for"
    rows = sec.pairs[(sec.pairs["errors"] > 0)]
    for r in rows[rows["scope"] == "pair"].head(SUMMARY_PAIRS).itertuples():
        lines.append(f"{r.true_name} → {r.pred_name}: {r.wrong_labels} of {r.errors} errors are {what}; {who} "
                     f"{r.model_right}.")
    for r in rows[rows["scope"] == "group"].itertuples():
        lines.append(f"Deep-dive group ({r.true_name}): {r.wrong_labels} of {r.errors} errors are {what}; {who} "
                     f"{r.model_right}.")
    return lines


def index_section(sec: LabelEvidence) -> str:
    """An HTML fragment for index.html: the source, the accuracies and the per-pair table."""
    e = html.escape
    head = ("Human-validated" if sec.validated else "Unvalidated estimate:") + " wrong test labels"
    acc = (f"Accuracy {_pct(sec.accuracy)} on the official labels, {_pct(sec.accuracy_corrected)} on the corrected "
           f"labels ({sec.n_correctable} corrected, {sec.n_excluded} without an agreed label left out)."
           if sec.validated else f"Accuracy {_pct(sec.accuracy)}; no corrected accuracy without human validation.")
    cols = ("pair", "errors", "wrong labels", "people chose the model's answer" if sec.validated
            else "suspected label = the model's answer", "share wrong")
    body = []
    for r in sec.pairs.itertuples():
        name = f"group: {r.true_name}" if r.scope == "group" else f"{r.true_name} → {r.pred_name}"
        share = "" if pd.isna(r.share_wrong) else f"{r.share_wrong:.0%}"
        body.append("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in (name, r.errors, r.wrong_labels,
                                                                       r.model_right, share)) + "</tr>")
    return (f'<section class="label-errors"><h2>{e(head)}</h2><p>{e(sec.source)}. {e(acc)} '
            f'Per class: deep_dive/label_errors.csv (scope "class").</p>'
            f'<table><thead><tr>{"".join(f"<th>{e(c)}</th>" for c in cols)}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></section>')
