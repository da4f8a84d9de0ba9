"""The numbers of a before/after comparison: pure functions of two models' predictions on one test set.

A and B are the two models; every delta is B − A. Nothing here loads models, draws or writes files:
helpers.compare runs both models and writes these tables to OUTPUT_DIR/compare/.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd

from helpers.compute import metrics
from helpers.data.datasets import readable

PER_CLASS_COLUMNS = ["class_id", "class_name", "superclass", "support", "correct_a", "correct_b",
                     "accuracy_a", "accuracy_b", "delta", "fixed", "broken"]
PAIR_COLUMNS = ["true_id", "true_name", "pred_id", "pred_name", "count_a", "count_b", "delta", "change",
                "share_a", "share_b", "same_superclass"]
IMAGE_COLUMNS = ["index", "status", "true_id", "true_name", "pred_a_id", "pred_a_name", "conf_a",
                 "pred_b_id", "pred_b_name", "conf_b", "p_true_a", "p_true_b"]


def _check(labels, preds_a, preds_b, num_classes: Optional[int] = None):
    """labels and both models' predictions as int64 arrays of one length (ids below num_classes when given)."""
    labels, preds_a = metrics.check_pair(labels, preds_a, num_classes)
    _, preds_b = metrics.check_pair(labels, preds_b, num_classes)
    return labels, preds_a, preds_b


def per_class_deltas(labels, preds_a, preds_b, class_names: Sequence[str],
                     fine_to_coarse: Optional[np.ndarray] = None,
                     coarse_names: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per class: correct and accuracy under A and B, delta = accuracy_b − accuracy_a, and the
    class's images fixed (A wrong, B right) and broken (A right, B wrong). fixed − broken = correct_b − correct_a."""
    c = len(class_names)
    labels, preds_a, preds_b = _check(labels, preds_a, preds_b, c)
    ok_a, ok_b = preds_a == labels, preds_b == labels
    support = np.bincount(labels, minlength=c)
    correct_a = np.bincount(labels[ok_a], minlength=c)
    correct_b = np.bincount(labels[ok_b], minlength=c)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc_a = np.where(support > 0, correct_a / np.maximum(support, 1), np.nan)
        acc_b = np.where(support > 0, correct_b / np.maximum(support, 1), np.nan)
    return pd.DataFrame({
        "class_id": np.arange(c),
        "class_name": [readable(n) for n in class_names],
        "superclass": [metrics.superclass_name(fine_to_coarse, coarse_names, k) for k in range(c)],
        "support": support, "correct_a": correct_a, "correct_b": correct_b,
        "accuracy_a": acc_a, "accuracy_b": acc_b, "delta": acc_b - acc_a,
        "fixed": np.bincount(labels[~ok_a & ok_b], minlength=c),
        "broken": np.bincount(labels[ok_a & ~ok_b], minlength=c),
    }, columns=PER_CLASS_COLUMNS)


def pair_changes(labels, preds_a, preds_b, class_names: Sequence[str],
                 fine_to_coarse: Optional[np.ndarray] = None) -> pd.DataFrame:
    """Every off-diagonal (true → predicted) pair whose count differs between A and B: count_a, count_b,
    delta = count_b − count_a (negative = fewer such errors under B: 'better'), and the share of the true
    class's images. Sorted by |delta| (largest change first), then better before worse, then ids."""
    c = len(class_names)
    labels, preds_a, preds_b = _check(labels, preds_a, preds_b, c)
    cm_a = metrics.confusion_matrix(labels, preds_a, c)
    cm_b = metrics.confusion_matrix(labels, preds_b, c)
    diff = cm_b - cm_a
    np.fill_diagonal(diff, 0)
    t, p = np.nonzero(diff)
    order = np.lexsort((p, t, diff[t, p], -np.abs(diff[t, p])))
    t, p = t[order], p[order]
    support = np.maximum(cm_a.sum(axis=1), 1)
    same = []
    for ti, pi in zip(t, p):
        ct, cp = metrics.superclass_of(fine_to_coarse, ti), metrics.superclass_of(fine_to_coarse, pi)
        same.append("" if ct < 0 or cp < 0 else ("yes" if ct == cp else "no"))
    return pd.DataFrame({
        "true_id": t.astype(np.int64), "true_name": [readable(class_names[i]) for i in t],
        "pred_id": p.astype(np.int64), "pred_name": [readable(class_names[i]) for i in p],
        "count_a": cm_a[t, p], "count_b": cm_b[t, p], "delta": diff[t, p],
        "change": np.where(diff[t, p] < 0, "better", "worse"),
        "share_a": cm_a[t, p] / support[t], "share_b": cm_b[t, p] / support[t], "same_superclass": same,
    }, columns=PAIR_COLUMNS)


def fixed_and_broken(labels, preds_a, preds_b, probs_a, probs_b) -> tuple[np.ndarray, np.ndarray]:
    """(fixed, broken) image indices. Fixed: A wrong, B right, A's most confident mistakes first.
    Broken: A right, B wrong, B's most confident mistakes first. Ties by index."""
    labels, preds_a, preds_b = _check(labels, preds_a, preds_b)
    probs_a = metrics.check_probs(probs_a, len(labels))
    probs_b = metrics.check_probs(probs_b, len(labels))
    ok_a, ok_b = preds_a == labels, preds_b == labels
    fixed = np.nonzero(~ok_a & ok_b)[0]
    broken = np.nonzero(ok_a & ~ok_b)[0]
    fixed = fixed[np.argsort(-probs_a[fixed, preds_a[fixed]], kind="stable")]
    broken = broken[np.argsort(-probs_b[broken, preds_b[broken]], kind="stable")]
    return fixed.astype(np.int64), broken.astype(np.int64)


def mcnemar_p(n_fixed: int, n_broken: int) -> float:
    """Exact two-sided McNemar test: p-value of seeing a split at least this uneven between fixed and broken
    images if both models were equally good (each changed image a fair coin). 1.0 when nothing changed."""
    from scipy.stats import binomtest
    n = n_fixed + n_broken
    return 1.0 if n == 0 else float(binomtest(min(n_fixed, n_broken), n, 0.5).pvalue)


def change_summary(labels, preds_a, preds_b, probs_a, probs_b,
                   fine_to_coarse: Optional[np.ndarray] = None, n_bins: int = 15) -> dict:
    """The headline numbers of A, B and B − A: accuracy, fixed/broken images (with McNemar's p),
    expected calibration error, high-confidence errors and, with superclasses, the within-superclass
    share of the errors."""
    labels, preds_a, preds_b = _check(labels, preds_a, preds_b)
    out: dict = {"n_images": int(len(labels))}
    ok_a, ok_b = preds_a == labels, preds_b == labels
    out["accuracy_a"], out["accuracy_b"] = float(ok_a.mean()), float(ok_b.mean())
    out["n_fixed"], out["n_broken"] = int((~ok_a & ok_b).sum()), int((ok_a & ~ok_b).sum())
    out["n_both_wrong"] = int((~ok_a & ~ok_b).sum())
    out["n_both_wrong_changed"] = int((~ok_a & ~ok_b & (preds_a != preds_b)).sum())
    out["mcnemar_p"] = mcnemar_p(out["n_fixed"], out["n_broken"])
    out["ece_a"] = metrics.expected_calibration_error(probs_a, labels, n_bins)[0]
    out["ece_b"] = metrics.expected_calibration_error(probs_b, labels, n_bins)[0]
    out["high_conf_errors_a"] = metrics.high_confidence_errors(labels, preds_a, probs_a)["count"]
    out["high_conf_errors_b"] = metrics.high_confidence_errors(labels, preds_b, probs_b)["count"]
    if fine_to_coarse is not None:
        sa = metrics.superclass_error_share(labels, preds_a, fine_to_coarse)
        sb = metrics.superclass_error_share(labels, preds_b, fine_to_coarse)
        out.update(superclass_share_a=sa["share"], superclass_share_b=sb["share"], superclass_chance=sa["chance"],
                   n_within_a=sa["n_within"], n_errors_a=sa["n_errors"],
                   n_within_b=sb["n_within"], n_errors_b=sb["n_errors"])
    for key in ("accuracy", "ece", "superclass_share", "high_conf_errors"):
        if f"{key}_a" in out:
            out[f"{key}_delta"] = out[f"{key}_b"] - out[f"{key}_a"]
    return out


def changed_images(labels, preds_a, preds_b, probs_a, probs_b, fixed, broken,
                   display_names: Sequence[str]) -> pd.DataFrame:
    """fixed_and_broken.csv: one row per fixed image, then per broken one (in the given order), with both
    models' prediction, its confidence and the probability each gave the true class."""
    names = display_names
    changed = np.concatenate([fixed, broken])
    return pd.DataFrame({
        "index": changed, "status": ["fixed"] * len(fixed) + ["broken"] * len(broken),
        "true_id": labels[changed], "true_name": [names[i] for i in labels[changed]],
        "pred_a_id": preds_a[changed], "pred_a_name": [names[i] for i in preds_a[changed]],
        "conf_a": probs_a[changed, preds_a[changed]], "pred_b_id": preds_b[changed],
        "pred_b_name": [names[i] for i in preds_b[changed]], "conf_b": probs_b[changed, preds_b[changed]],
        "p_true_a": probs_a[changed, labels[changed]], "p_true_b": probs_b[changed, labels[changed]],
    }, columns=IMAGE_COLUMNS)
