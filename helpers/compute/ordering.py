"""Orderings of a confusion matrix that put confusable classes next to each other, and its row
percentages. Pure numpy/scipy; the interactive matrix in index.html draws what these return.

With superclasses (CIFAR-100's 20 coarse groups, or SUPERCLASS_MAP) the classes are grouped by
superclass, the superclasses ordered so that confusable ones are adjacent, and the classes inside
each superclass ordered the same way. Without superclasses a hierarchical clustering of the
symmetrised, row-normalised confusion does the grouping.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from scipy.cluster.hierarchy import fcluster, leaves_list, linkage
from scipy.spatial.distance import squareform


def _square(cm) -> np.ndarray:
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {cm.shape}")
    return cm


def row_percent(cm) -> np.ndarray:
    """100 * cm[i, j] / (images of class i); NaN on the rows of classes with no test images."""
    cm = _square(cm)
    total = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 100.0 * cm / np.maximum(total, 1), np.nan)


def confusability(cm) -> np.ndarray:
    """Symmetric class-to-class similarity: the mean of the row-normalised confusion in both
    directions (a→b and b→a), zero on the diagonal and for classes without images. Row
    normalisation keeps large classes from dominating."""
    frac = np.nan_to_num(row_percent(cm) / 100.0, nan=0.0)
    sim = (frac + frac.T) / 2.0
    np.fill_diagonal(sim, 0.0)
    return sim


# scipy's optimal leaf ordering grows about with the cube of the classes: free at 300, 11-41 s at 1,000 (loaded
# 2-core machine) against 0.04 s for the linkage itself. Above this, the linkage's own leaf order is used.
OPTIMAL_ORDER_MAX = 300


def cluster_order(cm) -> np.ndarray:
    """A permutation of the classes from average-linkage clustering on 1 - confusability (scaled to
    [0, 1]), leaves in scipy's optimal order (up to OPTIMAL_ORDER_MAX classes; above, the tree's own order, in
    which every cluster is still contiguous), so classes that swap predictions sit together.
    The identity when no two classes are ever confused (nothing to group)."""
    cm = _square(cm)
    n = len(cm)
    sim = confusability(cm)
    if n <= 2 or sim.max() <= 0:
        return np.arange(n)
    dist = 1.0 - sim / sim.max()
    np.fill_diagonal(dist, 0.0)
    tree = linkage(squareform(dist, checks=False), method="average", optimal_ordering=n <= OPTIMAL_ORDER_MAX)
    return leaves_list(tree).astype(np.int64)


def coarse_matrix(cm, fine_to_coarse) -> np.ndarray:
    """The confusion between superclasses: cm summed over the classes of each superclass."""
    cm = _square(cm)
    f2c = np.asarray(fine_to_coarse, dtype=np.int64)
    if f2c.shape != (len(cm),) or (f2c < 0).any():
        raise ValueError(f"fine_to_coarse must give a superclass id >= 0 for each of the {len(cm)} classes")
    onehot = np.zeros((len(cm), int(f2c.max()) + 1))
    onehot[np.arange(len(cm)), f2c] = 1.0
    return onehot.T @ cm @ onehot


def superclass_order(cm, fine_to_coarse) -> np.ndarray:
    """Classes grouped by superclass: superclasses in cluster_order of their own confusion, and the
    classes inside each one in cluster_order of their sub-matrix. Classes whose superclass is
    unknown (-1: no test image said which) form one extra group."""
    cm = _square(cm)
    f2c = np.asarray(fine_to_coarse, dtype=np.int64)
    f2c = np.where(f2c < 0, f2c.max(initial=0) + 1, f2c)
    coarse = coarse_matrix(cm, f2c)
    present = np.unique(f2c)
    order = []
    for g in cluster_order(coarse[np.ix_(present, present)]):
        members = np.flatnonzero(f2c == present[g])
        order.extend(members[cluster_order(cm[np.ix_(members, members)])])
    return np.asarray(order, dtype=np.int64)


def confusion_order(cm, fine_to_coarse: Optional[np.ndarray] = None) -> tuple[np.ndarray, str]:
    """(permutation, how): by superclass when the data has superclasses, else by clustering."""
    if fine_to_coarse is not None:
        return superclass_order(cm, fine_to_coarse), "superclass"
    return cluster_order(cm), "clustering"


def block_spans(order, fine_to_coarse) -> list[tuple[int, int, int]]:
    """Runs of one superclass along `order`: (start, stop exclusive, superclass id) in positions."""
    groups = np.asarray(fine_to_coarse, dtype=np.int64)[np.asarray(order, dtype=np.int64)]
    spans, start = [], 0
    for k in range(1, len(groups) + 1):
        if k == len(groups) or groups[k] != groups[start]:
            spans.append((start, k, int(groups[start])))
            start = k
    return spans


def cluster_groups(cm, n_groups: int, order: Optional[np.ndarray] = None) -> np.ndarray:
    """A group id per class (0..n_groups-1, in the order the groups first appear along `order`, by default
    cluster_order: pass it when known, it is the costly part): the average-linkage tree of cluster_order cut
    into at most n_groups clusters. For datasets without superclasses, the report collapses the matrix to
    these groups."""
    cm = _square(cm)
    n = len(cm)
    sim = confusability(cm)
    if n <= 2 or sim.max() <= 0 or n_groups <= 1:
        return np.zeros(n, dtype=np.int64) if n_groups <= 1 or n <= 2 else (np.arange(n) * n_groups // n)
    dist = 1.0 - sim / sim.max()
    np.fill_diagonal(dist, 0.0)
    labels = fcluster(linkage(squareform(dist, checks=False), method="average"), t=n_groups, criterion="maxclust")
    first = {}
    for cls in (cluster_order(cm) if order is None else order):
        first.setdefault(int(labels[cls]), len(first))
    return np.array([first[int(g)] for g in labels], dtype=np.int64)


def most_confused_classes(cm, order, n: int = 25) -> np.ndarray:
    """The n classes involved in the most errors (off-diagonal counts of their row plus their column; ties: the
    lower class id), listed in the order they have in `order`, so the selection keeps the matrix's grouping.
    Every class when there are at most n."""
    cm = _square(cm)
    order = np.asarray(order, dtype=np.int64)
    if sorted(order.tolist()) != list(range(len(cm))):
        raise ValueError("order must be a permutation of range(num_classes)")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    off = cm - np.diag(np.diag(cm))
    errors = off.sum(axis=0) + off.sum(axis=1)
    top = np.lexsort((np.arange(len(cm)), -errors))[:n]
    return order[np.isin(order, top)]
