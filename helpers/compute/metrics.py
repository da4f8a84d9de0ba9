"""Confusion, calibration and example-ranking metrics over predictions.

Pure numpy/pandas: every function takes arrays (labels, preds, probs, a confusion matrix)
and returns numbers, index arrays or DataFrames. Nothing here draws or writes files.
Class names are passed raw ("maple_tree"); tables show them readable ("maple tree").
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd

from helpers.model.cam_store import best_first, worst_first
from helpers.data.datasets import readable
from helpers.errors import ConfigError, DataError

# Above this many k-subsets of the candidate classes, find_confused_group switches from
# exhaustive search to greedy growth (exhaustive stays well under a second below it).
MAX_EXHAUSTIVE_SUBSETS = 20_000

# A prediction this sure (max-probability) makes an error "high-confidence"; also the label-suspect bar.
HIGH_CONFIDENCE = 0.9
# A label suspect: the given label gets less than this probability while the model is >= HIGH_CONFIDENCE sure.
LABEL_SUSPECT_MAX_P_GIVEN = 0.05

GROUP_SEARCH_EXPLANATION = (
    "The group is the set of classes with the most test images misclassified among its members "
    "(both directions summed); candidates are the classes in the most-confused class pairs, searched "
    "exhaustively when there are few enough combinations and otherwise grown greedily from each top pair."
)


# ----------------------------------------------------------------------------- validation

def _as_index_array(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{name} must be one-dimensional, got shape {arr.shape}.")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise DataError(f"{name} must hold integer class ids.")
    return arr.astype(np.int64, copy=False)


def check_pair(labels, preds, num_classes: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """labels and preds as int64 arrays of one length; with num_classes, every id must lie in [0, num_classes)."""
    labels = _as_index_array(labels, "labels")
    preds = _as_index_array(preds, "preds")
    if labels.shape != preds.shape:
        raise DataError(f"labels {labels.shape} and preds {preds.shape} must have the same length.")
    if num_classes is not None and labels.size:
        lo = min(labels.min(), preds.min())
        hi = max(labels.max(), preds.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"class ids must lie in [0, {num_classes - 1}], found {lo}..{hi}; "
                "check that the model's number of outputs matches the dataset's classes."
            )
    return labels, preds


def check_probs(probs, n: int, for_ranking: bool = False) -> np.ndarray:
    """probs as a float64 (N, C) array; `for_ranking=True` keeps float32 as is: converting is exact, so every
    order is the same, and the galleries rank 10k x C probabilities a few hundred times (copies add up)."""
    probs = np.asarray(probs)
    if not (for_ranking and probs.dtype in (np.float32, np.float64)):
        probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != n:
        raise DataError(f"probs must have shape (N={n}, C), got {probs.shape}.")
    return probs


def superclass_of(fine_to_coarse: Optional[np.ndarray], cls: int) -> int:
    """Coarse id of a fine class, -1 when unknown."""
    if fine_to_coarse is None or cls >= len(fine_to_coarse):
        return -1
    return int(fine_to_coarse[cls])


def superclass_name(fine_to_coarse: Optional[np.ndarray], coarse_names: Optional[Sequence[str]], cls: int) -> str:
    """Readable superclass name of a fine class, "" when unknown."""
    coarse = superclass_of(fine_to_coarse, cls)
    return readable(coarse_names[coarse]) if coarse >= 0 and coarse_names is not None else ""


# ----------------------------------------------------------------------------- confusion

def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: rows are true classes, columns predicted classes."""
    labels, preds = check_pair(labels, preds, num_classes)
    flat = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def per_class_table(labels, preds, probs, class_names: Sequence[str],
                    fine_to_coarse: Optional[np.ndarray] = None,
                    coarse_names: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per class: support, accuracy, mean confidence and its most frequent wrong prediction.

    mean_confidence is the mean max-probability over the class's images (what the model *felt*,
    right or wrong). Classes without test images get NaN accuracy/confidence.
    """
    num_classes = len(class_names)
    labels, preds = check_pair(labels, preds, num_classes)
    probs = check_probs(probs, len(labels))
    cm = confusion_matrix(labels, preds, num_classes)
    support = cm.sum(axis=1)
    correct = np.diag(cm)
    conf_sum = np.bincount(labels, weights=probs.max(axis=1), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(support > 0, correct / np.maximum(support, 1), np.nan)
        mean_conf = np.where(support > 0, conf_sum / np.maximum(support, 1), np.nan)

    off = cm.copy()
    np.fill_diagonal(off, 0)
    top_wrong = off.argmax(axis=1)          # argmax picks the lowest id on ties
    top_wrong_count = off[np.arange(num_classes), top_wrong]

    rows = []
    for c in range(num_classes):
        has_wrong = top_wrong_count[c] > 0
        rows.append({
            "class_id": c,
            "class_name": readable(class_names[c]),
            "superclass": superclass_name(fine_to_coarse, coarse_names, c),
            "support": int(support[c]),
            "correct": int(correct[c]),
            "accuracy": float(accuracy[c]),
            "mean_confidence": float(mean_conf[c]),
            "top_wrong_prediction": readable(class_names[top_wrong[c]]) if has_wrong else "",
            "top_wrong_count": int(top_wrong_count[c]),
        })
    return pd.DataFrame(rows, columns=[
        "class_id", "class_name", "superclass", "support", "correct", "accuracy",
        "mean_confidence", "top_wrong_prediction", "top_wrong_count"])


MOST_CONFUSED_COLUMNS = ["rank", "true_id", "true_name", "pred_id", "pred_name", "count",
                         "share_of_true", "same_superclass"]


def most_confused(cm: np.ndarray, class_names: Sequence[str], k: Optional[int] = 15,
                  fine_to_coarse: Optional[np.ndarray] = None, min_count: int = 1) -> pd.DataFrame:
    """The k largest off-diagonal cells (ordered pairs true -> predicted).

    Sorted by count desc, then share_of_true desc, then (true_id, pred_id) asc so ties are
    deterministic. share_of_true = count / all test images of the true class.
    same_superclass is a nullable boolean: <NA> when either class has no known superclass (pairs_for_csv
    writes it as yes/no/empty).
    k=None returns every pair with count >= min_count.
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_names):
        raise DataError(f"cm must be ({len(class_names)}, {len(class_names)}), got {cm.shape}.")
    row_total = cm.sum(axis=1)
    true_ids, pred_ids = np.nonzero((cm >= max(min_count, 1)) & ~np.eye(len(cm), dtype=bool))
    counts = cm[true_ids, pred_ids]
    shares = counts / np.maximum(row_total[true_ids], 1)
    order = np.lexsort((pred_ids, true_ids, -shares, -counts))
    if k is not None:
        order = order[:k]
    rows = []
    for rank, i in enumerate(order, start=1):
        t, p = int(true_ids[i]), int(pred_ids[i])
        ct, cp = superclass_of(fine_to_coarse, t), superclass_of(fine_to_coarse, p)
        same = pd.NA if ct < 0 or cp < 0 else ct == cp
        rows.append({"rank": rank, "true_id": t, "true_name": readable(class_names[t]),
                     "pred_id": p, "pred_name": readable(class_names[p]), "count": int(counts[i]),
                     "share_of_true": float(shares[i]), "same_superclass": same})
    table = pd.DataFrame(rows, columns=MOST_CONFUSED_COLUMNS)
    table["same_superclass"] = table["same_superclass"].astype("boolean")
    return table


def yes_no(value) -> str:
    """A nullable boolean as text: "yes", "no", or "" when unknown (<NA> or None)."""
    return "" if value is None or value is pd.NA else ("yes" if value else "no")


def pairs_for_csv(pairs: pd.DataFrame) -> pd.DataFrame:
    """A most_confused() table as the CSV shows it: same_superclass as yes/no, empty when unknown."""
    out = pairs.copy()
    out["same_superclass"] = [yes_no(v) for v in out["same_superclass"]]
    return out


def superclass_error_share(labels, preds, fine_to_coarse: np.ndarray) -> dict:
    """How many errors stay inside the true class's superclass, against chance.

    Returns n_errors, n_within, share (= n_within / n_errors) and chance: the share expected if
    each wrong prediction were uniform over the other C-1 classes, i.e. the mean over errors of
    (siblings of the true class) / (C-1); 4/99 on CIFAR-100. Errors involving a class with no
    known superclass (-1) are left out of all counts.
    """
    fine_to_coarse = np.asarray(fine_to_coarse, dtype=np.int64)
    num_classes = len(fine_to_coarse)
    labels, preds = check_pair(labels, preds, num_classes)
    wrong = labels != preds
    known = (fine_to_coarse[labels] >= 0) & (fine_to_coarse[preds] >= 0)
    err = wrong & known
    n_errors = int(err.sum())
    n_within = int((err & (fine_to_coarse[labels] == fine_to_coarse[preds])).sum())
    group_size = np.bincount(fine_to_coarse[fine_to_coarse >= 0], minlength=1)
    siblings = np.where(fine_to_coarse >= 0, group_size[np.maximum(fine_to_coarse, 0)] - 1, 0)
    if n_errors == 0 or num_classes < 2:
        return {"n_errors": n_errors, "n_within": n_within, "share": float("nan"), "chance": float("nan")}
    chance = float(siblings[labels[err]].mean() / (num_classes - 1))
    return {"n_errors": n_errors, "n_within": n_within, "share": n_within / n_errors, "chance": chance}


def coarse_confusion_matrix(labels, preds, fine_to_coarse: np.ndarray, n_coarse: int) -> np.ndarray:
    """(n_coarse, n_coarse) confusion between superclasses (every image counted once)."""
    fine_to_coarse = np.asarray(fine_to_coarse, dtype=np.int64)
    labels, preds = check_pair(labels, preds, len(fine_to_coarse))
    used = np.union1d(labels, preds)
    if np.any(fine_to_coarse[used] < 0):
        missing = used[fine_to_coarse[used] < 0].tolist()
        raise DataError(f"{len(missing)} class(es) have no superclass (class ids {', '.join(map(str, missing[:10]))}"
                        f"{', ...' if len(missing) > 10 else ''}). Set SUPERCLASS_MAP = {{class name: group name}} "
                        f"with a group for every class of the dataset.")
    return confusion_matrix(fine_to_coarse[labels], fine_to_coarse[preds], n_coarse)


def top_within_superclass_pairs(pairs: Union[pd.DataFrame, np.ndarray],
                                class_names: Optional[Sequence[str]] = None,
                                fine_to_coarse: Optional[np.ndarray] = None,
                                k: Optional[int] = 15) -> pd.DataFrame:
    """The most-confused pairs whose two classes share a superclass, re-ranked from 1.

    `pairs` is either a most_confused() table (filtered as is) or a confusion matrix
    (then class_names and fine_to_coarse are required and all pairs are considered).
    """
    if isinstance(pairs, pd.DataFrame):
        table = pairs
    else:
        if class_names is None or fine_to_coarse is None:
            raise ConfigError("With a confusion matrix, pass class_names and fine_to_coarse too.")
        table = most_confused(pairs, class_names, k=None, fine_to_coarse=fine_to_coarse)
    within = table[table["same_superclass"].fillna(False).astype(bool)]
    if k is not None:
        within = within.head(k)
    within = within.reset_index(drop=True).copy()
    within["rank"] = np.arange(1, len(within) + 1)
    return within


# ----------------------------------------------------------------------------- confidence

def high_confidence_errors(labels, preds, probs, threshold: float = HIGH_CONFIDENCE) -> dict:
    """Wrong predictions made with max-probability >= threshold.

    indices are sorted by confidence desc (ties by index). share_of_errors is NaN without errors.
    """
    labels, preds = check_pair(labels, preds)
    probs = check_probs(probs, len(labels))
    conf = probs.max(axis=1)
    wrong = labels != preds
    hits = np.nonzero(wrong & (conf >= threshold))[0]
    hits = hits[np.argsort(-conf[hits], kind="stable")]
    n_wrong = int(wrong.sum())
    return {
        "count": int(hits.size),
        "share_of_errors": hits.size / n_wrong if n_wrong else float("nan"),
        "share_of_all": hits.size / len(labels) if len(labels) else float("nan"),
        "indices": hits.astype(np.int64),
    }


def expected_calibration_error(probs, labels, n_bins: int = 15) -> tuple[float, pd.DataFrame]:
    """Standard equal-width ECE on the max-probability.

    Bins are (lower, upper] over [0, 1] (the first also holds 0); ECE = sum over bins of
    count/N * |accuracy - mean confidence|. Empty bins have NaN accuracy/confidence.
    """
    labels = _as_index_array(labels, "labels")
    probs = check_probs(probs, len(labels))
    if n_bins < 1:
        raise ConfigError(f"n_bins must be >= 1, got {n_bins}.")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_ids = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    count = np.bincount(bin_ids, minlength=n_bins)
    acc_sum = np.bincount(bin_ids, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(bin_ids, weights=conf, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(count > 0, acc_sum / np.maximum(count, 1), np.nan)
        mean_conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
    n = len(labels)
    ece = float(np.nansum(count / max(n, 1) * np.abs(acc - mean_conf))) if n else float("nan")
    bins = pd.DataFrame({"bin_lower": edges[:-1], "bin_upper": edges[1:], "count": count.astype(np.int64),
                         "accuracy": acc, "confidence": mean_conf})
    return ece, bins


def overconfident_errors_by_class(labels, preds, probs, class_names: Sequence[str],
                                  threshold: float = HIGH_CONFIDENCE) -> pd.DataFrame:
    """Per true class: errors made with confidence >= threshold.

    Columns class_id, class_name, count, errors (all errors of the class). Only classes with
    count > 0, sorted by count desc then class_id.
    """
    labels, preds = check_pair(labels, preds, len(class_names))
    probs = check_probs(probs, len(labels))
    wrong = labels != preds
    confident = wrong & (probs.max(axis=1) >= threshold)
    count = np.bincount(labels[confident], minlength=len(class_names))
    errors = np.bincount(labels[wrong], minlength=len(class_names))
    ids = np.nonzero(count)[0]
    ids = ids[np.lexsort((ids, -count[ids]))]
    return pd.DataFrame({"class_id": ids.astype(np.int64),
                         "class_name": [readable(class_names[i]) for i in ids],
                         "count": count[ids].astype(np.int64),
                         "errors": errors[ids].astype(np.int64)},
                        columns=["class_id", "class_name", "count", "errors"])


# ----------------------------------------------------------------------------- example ranking

def rank_worst(labels, preds, probs, cls: int, n: int) -> np.ndarray:
    """Up to n indices of class `cls` that show its failures best (cam_store.worst_first order).

    First the misclassified images, most confident in the wrong (predicted) class first; then,
    if fewer than n, the correct ones the model was least sure about. Ties by index.
    """
    labels, preds = check_pair(labels, preds)
    probs = check_probs(probs, len(labels), for_ranking=True)
    idx = np.flatnonzero(labels == cls)
    order = worst_first(idx, labels[idx], preds[idx], probs[idx, preds[idx]], probs[idx, cls])
    return idx[order][:max(n, 0)].astype(np.int64)


def rank_best(labels, preds, probs, cls: int, n: int) -> np.ndarray:
    """Up to n correctly classified images of `cls`, most confident first (ties by index)."""
    labels, preds = check_pair(labels, preds)
    probs = check_probs(probs, len(labels), for_ranking=True)
    idx = np.flatnonzero((labels == cls) & (preds == cls))
    return idx[best_first(idx, labels[idx], probs[idx, cls])][:max(n, 0)].astype(np.int64)


def gallery_examples(labels, preds, probs, cls: int, n_worst: int, n_best: int) -> tuple[list[int], list[int]]:
    """What a class gallery shows: its `n_worst` worst images (rank_worst) and its `n_best` best ones
    (rank_best) that are not already among the worst (a class with few errors lists its least sure correct
    images as worst)."""
    worst = [int(i) for i in rank_worst(labels, preds, probs, cls, n_worst)]
    taken = set(worst)
    best = [int(i) for i in rank_best(labels, preds, probs, cls, n_best + n_worst) if int(i) not in taken]
    return worst, best[:max(n_best, 0)]


def pair_examples(labels, preds, probs, true_cls: int, pred_cls: int, n: int) -> np.ndarray:
    """Up to n images of true_cls predicted as pred_cls, most confident in pred_cls first."""
    labels, preds = check_pair(labels, preds)
    probs = check_probs(probs, len(labels), for_ranking=True)
    idx = np.nonzero((labels == true_cls) & (preds == pred_cls))[0]
    return idx[np.argsort(-probs[idx, pred_cls], kind="stable")][:max(n, 0)].astype(np.int64)


def _p_given_label(labels, probs, for_ranking: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(probs, p[i, labels[i]]): how much the model believes each image's given label."""
    labels = _as_index_array(labels, "labels")
    probs = check_probs(probs, len(labels), for_ranking=for_ranking)
    return probs, probs[np.arange(len(labels)), labels]


def label_suspects(labels, probs, n: int = 24) -> np.ndarray:
    """Up to n indices whose given label the model believes least: lowest p[i, label[i]] first,
    ties broken by higher max-probability (the model is sure of something else), then index."""
    probs, p_given = _p_given_label(labels, probs, for_ranking=True)
    order = np.lexsort((np.arange(len(p_given)), -probs.max(axis=1), p_given))
    return order[:max(n, 0)].astype(np.int64)


def label_suspect_mask(labels, probs, max_p_given: float = LABEL_SUSPECT_MAX_P_GIVEN,
                       min_confidence: float = HIGH_CONFIDENCE) -> np.ndarray:
    """Images whose given label gets < max_p_given probability while the max-probability is >= min_confidence
    (LABEL_SUSPECT_MAX_P_GIVEN and HIGH_CONFIDENCE by default): the model confidently says something else."""
    # float64: the thresholds compare as in float64 whatever the dtype of probs
    probs, p_given = _p_given_label(labels, probs)
    return (p_given < max_p_given) & (probs.max(axis=1) >= min_confidence)


def count_label_suspects(labels, probs) -> int:
    """How many images label_suspect_mask flags (with its default thresholds)."""
    return int(label_suspect_mask(labels, probs).sum())


# ----------------------------------------------------------------------------- confused group

def _symmetric_off_diagonal(cm: np.ndarray) -> np.ndarray:
    cm = np.asarray(cm, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise DataError(f"cm must be square, got shape {cm.shape}.")
    sym = cm + cm.T
    np.fill_diagonal(sym, 0)
    return sym


def group_objective(cm: np.ndarray, group: Sequence[int]) -> int:
    """Images misclassified between members of `group` (both directions, diagonal excluded)."""
    g = np.asarray(list(group), dtype=np.int64)
    block = np.asarray(cm, dtype=np.int64)[np.ix_(g, g)]
    return int(block.sum() - np.trace(block))


def _top_pairs(sym: np.ndarray, n_pairs: int) -> list[tuple[int, int]]:
    iu, ju = np.triu_indices(len(sym), k=1)
    vals = sym[iu, ju]
    order = np.lexsort((ju, iu, -vals))[:n_pairs]
    return [(int(iu[o]), int(ju[o])) for o in order]


def find_confused_group(cm: np.ndarray, k: int = 3, n_seed_pairs: int = 20) -> tuple[list[int], int]:
    """The k classes most confused with one another (see GROUP_SEARCH_EXPLANATION).

    Candidates are the classes in the n_seed_pairs largest symmetric pairs (cm + cm.T). If at
    most MAX_EXHAUSTIVE_SUBSETS k-subsets exist, all are scored; otherwise the group is grown
    greedily from each seed pair, adding the class (any class) that adds the most confusion.
    Ties go to the lexicographically smallest group. Returns (group, objective) with the group
    ordered by each member's in-group confusion desc (ties by class id).
    """
    sym = _symmetric_off_diagonal(cm)
    num_classes = len(sym)
    if k < 2 or k > num_classes:
        raise ConfigError(f"GROUP_SIZE must be between 2 and the number of classes ({num_classes}), got {k}.")
    seeds = _top_pairs(sym, max(n_seed_pairs, 1))
    candidates = sorted({c for pair in seeds for c in pair})
    if len(candidates) < k:
        # Too few confused pairs: top up with the classes involved in the most confusion overall.
        by_total = np.lexsort((np.arange(num_classes), -sym.sum(axis=1)))
        for c in by_total:
            if len(candidates) >= k:
                break
            if int(c) not in candidates:
                candidates.append(int(c))
        candidates.sort()

    best_group: Optional[tuple[int, ...]] = None
    best_score = -1
    if math.comb(len(candidates), k) <= MAX_EXHAUSTIVE_SUBSETS:
        for combo in itertools.combinations(candidates, k):
            score = int(sym[np.ix_(combo, combo)].sum()) // 2
            if score > best_score:
                best_group, best_score = combo, score
    else:
        for a, b in seeds:
            group = [a, b]
            while len(group) < k:
                gain = sym[:, group].sum(axis=1)
                gain[group] = -1
                group.append(int(np.argmax(gain)))  # argmax: lowest id on ties
            combo = tuple(sorted(group))
            score = int(sym[np.ix_(combo, combo)].sum()) // 2
            if score > best_score or (score == best_score and combo < best_group):
                best_group, best_score = combo, score

    members = np.array(best_group, dtype=np.int64)
    in_group = sym[np.ix_(members, members)].sum(axis=1)
    ordered = members[np.lexsort((members, -in_group))]
    return [int(c) for c in ordered], int(best_score)


def group_confusion(cm: np.ndarray, group: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(counts, row_pct) among the group's classes, both k x k in the group's order.

    row_pct[i, j] = percent of ALL test images of group[i] that were predicted as group[j], so a
    row need not sum to 100: the rest went to classes outside the group. NaN for empty classes.
    """
    cm = np.asarray(cm, dtype=np.int64)
    g = np.asarray(list(group), dtype=np.int64)
    counts = cm[np.ix_(g, g)]
    row_total = cm[g].sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        row_pct = np.where(row_total > 0, 100.0 * counts / np.maximum(row_total, 1), np.nan)
    return counts, row_pct
