"""Wrong test labels per confused pair: how many of a pair's errors are really wrong labels, and how often the
people who checked them chose the model's answer. Pure functions over arrays; nothing here reads or writes files.

Every function takes the evidence aligned to the analysed images: `wrong` (bool, n: the label is judged wrong),
`suggested` (int, n: the label the evidence proposes instead, -1 where none). With human validation `wrong` is
"fewer than 3 of 5 workers chose the given label" and `suggested` the guessed label where at least 3 of 5 chose
it; without it both come from an unvalidated estimate (confident_learning_mask, or label_suspect_mask).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd

from helpers.data.datasets import readable
from helpers.errors import DataError

PAIR_COLUMNS = ["scope", "true_id", "true_name", "pred_id", "pred_name", "errors", "wrong_labels",
                "model_right", "share_wrong"]
CLASS_COLUMNS = ["scope", "class_id", "class_name", "images", "accuracy", "wrong_labels", "correctable",
                 "excluded", "images_corrected", "accuracy_corrected"]


def align(n: int, index: np.ndarray, wrong: np.ndarray, correctable: np.ndarray,
          guessed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (n) arrays from the checked rows: wrong (bool) and suggested (int, -1 unless correctable).
    Rows whose index is outside 0..n-1 (a LIMIT run analyses the first n) are dropped."""
    index = np.asarray(index, dtype=np.int64)
    inside = (index >= 0) & (index < n)
    wrong_n = np.zeros(n, dtype=bool)
    suggested = np.full(n, -1, dtype=np.int64)
    wrong_n[index[inside]] = np.asarray(wrong, dtype=bool)[inside]
    fix = inside & np.asarray(correctable, dtype=bool) & np.asarray(wrong, dtype=bool)
    suggested[index[fix]] = np.asarray(guessed, dtype=np.int64)[fix]
    return wrong_n, suggested


def corrected_labels(labels: np.ndarray, wrong: np.ndarray, suggested: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels with the suggested label where there is one, keep). A wrong label without a suggestion (the workers
    chose "neither" or "both", or split) has no known right answer, so its image is excluded (keep False) from
    the corrected accuracy rather than counted for either side."""
    labels = np.asarray(labels, dtype=np.int64)
    fixed = np.where(suggested >= 0, suggested, labels)
    keep = ~(np.asarray(wrong, dtype=bool) & (suggested < 0))
    return fixed, keep


def accuracies(labels, preds, wrong, suggested) -> tuple[float, Optional[float]]:
    """(official accuracy, accuracy on the corrected labels over the images kept; None when none is kept)."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    fixed, keep = corrected_labels(labels, wrong, suggested)
    official = float(np.mean(labels == preds)) if len(labels) else float("nan")
    return official, (float(np.mean(fixed[keep] == preds[keep])) if keep.any() else None)


def _counts(mask: np.ndarray, preds: np.ndarray, wrong: np.ndarray, suggested: np.ndarray) -> tuple[int, int, int]:
    """(errors, of which wrong labels, of which the suggested label is the model's prediction)."""
    bad = mask & wrong
    return int(mask.sum()), int(bad.sum()), int((bad & (suggested == preds)).sum())


def pair_table(labels, preds, wrong, suggested, pairs: pd.DataFrame, class_names: Sequence[str],
               group: Optional[Sequence[int]] = None) -> pd.DataFrame:
    """One row per confused pair (pairs: the Confusion section's table, true_id and pred_id), scope "pair", and,
    when `group` is given, one row for every error among the group's classes (both directions), scope "group"."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    wrong, suggested = np.asarray(wrong, dtype=bool), np.asarray(suggested, dtype=np.int64)
    if not (len(labels) == len(preds) == len(wrong) == len(suggested)):
        raise DataError(f"labels, preds, wrong and suggested must have one entry per image "
                        f"({len(labels)}, {len(preds)}, {len(wrong)}, {len(suggested)}).")
    rows = []
    for t, q in zip(pairs["true_id"].astype(int), pairs["pred_id"].astype(int)):
        e, w, m = _counts((labels == t) & (preds == q), preds, wrong, suggested)
        rows.append(("pair", t, readable(class_names[t]), q, readable(class_names[q]), e, w, m))
    if group is not None and len(group):
        g = np.asarray(list(group), dtype=np.int64)
        e, w, m = _counts(np.isin(labels, g) & np.isin(preds, g) & (labels != preds), preds, wrong, suggested)
        names = ", ".join(readable(class_names[c]) for c in g)
        rows.append(("group", -1, names, -1, names, e, w, m))
    table = pd.DataFrame(rows, columns=PAIR_COLUMNS[:-1])
    table["share_wrong"] = (table["wrong_labels"] / table["errors"].where(table["errors"] > 0)).round(4)
    return table


def class_table(labels, preds, wrong, suggested, class_names: Sequence[str]) -> pd.DataFrame:
    """Per class (by the given label): images, accuracy, wrong labels, correctable ones, excluded ones; and on the
    corrected labels (by the corrected label, excluded images left out): images and accuracy."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    wrong, suggested = np.asarray(wrong, dtype=bool), np.asarray(suggested, dtype=np.int64)
    c = len(class_names)
    fixed, keep = corrected_labels(labels, wrong, suggested)
    n = np.bincount(labels, minlength=c)
    hit = np.bincount(labels[labels == preds], minlength=c)
    nk = np.bincount(fixed[keep], minlength=c)
    hitk = np.bincount(fixed[keep & (fixed == preds)], minlength=c)
    with np.errstate(invalid="ignore", divide="ignore"):
        table = pd.DataFrame({
            "scope": "class", "class_id": np.arange(c), "class_name": [readable(x) for x in class_names],
            "images": n, "accuracy": np.round(hit / np.where(n > 0, n, np.nan), 4),
            "wrong_labels": np.bincount(labels[wrong], minlength=c),
            "correctable": np.bincount(labels[wrong & (suggested >= 0)], minlength=c),
            "excluded": np.bincount(labels[~keep], minlength=c),
            "images_corrected": nk, "accuracy_corrected": np.round(hitk / np.where(nk > 0, nk, np.nan), 4)})
    return table[CLASS_COLUMNS]


def _confident_class(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confident, best): confident learning's per-class thresholds t_j, the mean p_j over the images labelled j
    (the class's self-confidence). An image is confidently of class k when p_k >= t_k, and of the most probable
    such class when several are. Per-class thresholds, not one global cut-off, so a class the model is never
    very sure of (a shirt) still gets its confident members."""
    c = probs.shape[1]
    sums = np.zeros(c)
    np.add.at(sums, labels, probs[np.arange(len(labels)), labels])
    count = np.bincount(labels, minlength=c)
    thresholds = np.where(count > 0, sums / np.maximum(count, 1), np.inf)   # a class nobody has: never confident
    above = probs >= thresholds[None, :]
    return above.any(axis=1), np.where(above, probs, -1.0).argmax(axis=1)


def confident_joint(labels, probs) -> np.ndarray:
    """(C, C) counts of (given label, confident class) over the images confidently of some class."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise DataError(f"probs must be (N={len(labels)}, C), got {probs.shape}.")
    confident, best = _confident_class(labels, probs)
    joint = np.zeros((probs.shape[1], probs.shape[1]), dtype=np.int64)
    np.add.at(joint, (labels[confident], best[confident]), 1)
    return joint


def confident_learning_mask(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    """(flagged, suggested): confident learning's label issues, pruned by noise rate (Northcutt, Jiang & Chuang,
    JAIR 2021; what cleanlab.filter.find_label_issues does by default), in numpy so it runs without cleanlab.

    The confident joint, calibrated so each row sums to its class's image count, estimates how many images
    labelled i really are k; for every (i, k) that many images labelled i with the largest p_k - p_i are flagged,
    then those the model itself predicts as labelled are let go. Counting per pair, rather than flagging every
    image that passes a threshold, keeps the images of a hard class (low self-confidence) whose margin is
    clear: on Fashion-MNIST with 10% of the shirts relabelled T-shirt it finds ~80% of them, the threshold rule
    ~58%. `suggested` is the k that flagged the image (the largest p_k when several did), -1 where not flagged.
    In-sample here: the probabilities are the analysed model's own, not cross-validated."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    joint = confident_joint(labels, probs).astype(np.float64)
    n_class = np.bincount(labels, minlength=probs.shape[1])
    calibrated = joint / np.maximum(joint.sum(axis=1, keepdims=True), 1) * n_class[:, None]
    flagged = np.zeros(len(labels), dtype=bool)
    suggested = np.full(len(labels), -1, dtype=np.int64)
    for i, k in zip(*np.nonzero(np.round(calibrated) * (1 - np.eye(len(joint))) > 0)):
        rows = np.flatnonzero(labels == i)
        top = rows[np.argsort(-(probs[rows, k] - probs[rows, i]), kind="stable")[:int(round(calibrated[i, k]))]]
        better = (suggested[top] < 0) | (probs[top, k] > probs[top, np.maximum(suggested[top], 0)])
        suggested[top[better]] = k
        flagged[top] = True
    flagged &= probs.argmax(axis=1) != labels
    suggested[~flagged] = -1
    return flagged, suggested


def mask_from_indices(n: int, indices) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[np.asarray(indices, dtype=np.int64)] = True
    return mask


def recall_precision(flagged: np.ndarray, planted: np.ndarray) -> tuple[float, float]:
    """(share of planted images flagged, share of flagged images that were planted)."""
    flagged, planted = np.asarray(flagged, dtype=bool), np.asarray(planted, dtype=bool)
    hit = int((flagged & planted).sum())
    return hit / max(int(planted.sum()), 1), hit / max(int(flagged.sum()), 1)
