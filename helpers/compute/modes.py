"""Failure modes inside one confusion: are a pair's errors one kind of mistake or several? Each error is
described by its penultimate features and by where its true-class CAM and predicted-class CAM disagree; the
errors are clustered for k = 1..MAX_MODES and the number of modes chosen by silhouette.

Pure functions over arrays: features (n, D), min-max normalised CAMs (n, H, W) in, numbers out.

The representation: the features z-scored per dimension (over this pair's errors), and the true-minus-predicted
CAM average-pooled to CAM_GRID x CAM_GRID, centred per cell and scaled by its overall std. Each block is then
divided by the square root of its width, so each has a total variance of 1 and weighs the same in the distances
(CAM_WEIGHT = 0.5) whether the model has 32 or 2048 features: otherwise the wider block would decide alone.

The choice: silhouette is undefined for one cluster, so one mode is the default and k >= 2 has to earn its
place: the best k-means silhouette over k = 2..MAX_MODES must reach MIN_SILHOUETTE (0.25, Kaufman &
Rousseeuw's "no substantial structure" bound) and every mode must hold MIN_MODE_SIZE errors (a silhouette can be
high for one outlier set apart). Pairs with fewer than MIN_ERRORS errors keep one mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

MAX_MODES = 4
MIN_ERRORS = 6          # fewer errors than this: one mode, nothing to cluster
MIN_MODE_SIZE = 3       # every mode of a k >= 2 solution holds at least this many errors
MIN_SILHOUETTE = 0.25   # below it a split describes noise (Kaufman & Rousseeuw 1990: <= 0.25, no structure)
CAM_GRID = 7            # the CAM difference is compared on a 7x7 grid: where, not pixel detail
CAM_WEIGHT = 0.5        # share of the distance that comes from the CAM difference (the rest: the features)
CAM_LEVEL = 0.5         # a pixel counts as "looked at" above this share of the map's maximum
N_INIT = 10


@dataclass(frozen=True)
class ModeChoice:
    """The clustering of one pair's errors."""
    k: int                          # the number of modes chosen
    labels: np.ndarray              # (n,) mode of each error, 0..k-1, largest mode first
    silhouettes: dict[int, float]   # k -> silhouette of the k-means solution (NaN: not tried or a mode too small)
    reason: str                     # why this k, in words


def pool(maps: np.ndarray, size: int = CAM_GRID) -> np.ndarray:
    """(n, H, W) -> (n, size, size) by area averaging, as torch's adaptive_avg_pool2d: cell i covers rows
    floor(i*H/size) to ceil((i+1)*H/size)."""
    maps = np.asarray(maps, np.float64)
    n, h, w = maps.shape
    # an integral image makes every cell's sum four lookups
    cum = np.zeros((n, h + 1, w + 1))
    cum[:, 1:, 1:] = maps.cumsum(axis=1).cumsum(axis=2)
    r0 = (np.arange(size) * h) // size
    r1 = -((-(np.arange(size) + 1) * h) // size)
    c0 = (np.arange(size) * w) // size
    c1 = -((-(np.arange(size) + 1) * w) // size)
    total = (cum[:, r1][:, :, c1] - cum[:, r0][:, :, c1] - cum[:, r1][:, :, c0] + cum[:, r0][:, :, c0])
    return total / ((r1 - r0)[:, None] * (c1 - c0)[None, :])


def _zscore(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=0)
    sd = x.std(axis=0)
    return np.divide(x, sd, out=np.zeros_like(x), where=sd > 1e-12)


def representation(features: np.ndarray, cam_true: np.ndarray, cam_pred: np.ndarray,
                   cam_weight: float = CAM_WEIGHT, grid: int = CAM_GRID) -> np.ndarray:
    """(n, D + grid²): z-scored features and the pooled true-minus-predicted CAM, each block scaled to total
    variance 1 and weighted sqrt(1 - cam_weight) : sqrt(cam_weight), so squared distances split in that ratio."""
    f = _zscore(np.asarray(features, np.float64).reshape(len(features), -1))
    f /= np.sqrt(max(f.shape[1], 1))
    d = pool(np.asarray(cam_true, np.float64) - np.asarray(cam_pred, np.float64), grid).reshape(len(f), -1)
    d = d - d.mean(axis=0)
    sd = d.std()
    d = d / sd if sd > 1e-12 else np.zeros_like(d)   # one scalar: the cells keep their relative weights
    d /= np.sqrt(d.shape[1])
    return np.hstack([np.sqrt(1 - cam_weight) * f, np.sqrt(cam_weight) * d])


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Mode 0 the largest, ties by first appearance, so a mode's number means the same from run to run."""
    ids, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = ids[np.lexsort((first, -counts))]
    return np.argsort(order)[np.searchsorted(ids, labels)]


def choose_modes(x: np.ndarray, seed: int = 0, max_modes: int = MAX_MODES, min_errors: int = MIN_ERRORS,
                 min_size: int = MIN_MODE_SIZE, min_silhouette: float = MIN_SILHOUETTE) -> ModeChoice:
    """k-means for k = 2..max_modes on `x` (n, d); the k with the best silhouette if it reaches min_silhouette
    and every mode has min_size errors, else one mode."""
    x = np.asarray(x, np.float64)
    n = len(x)
    one = np.zeros(n, np.int64)
    sil: dict[int, float] = {}
    if n < min_errors:
        return ModeChoice(1, one, sil, f"{n} errors (< {min_errors}): one mode")
    if np.allclose(x, x[0]):
        return ModeChoice(1, one, sil, "all errors alike: one mode")
    fits: dict[int, np.ndarray] = {}
    for k in range(2, min(max_modes, n // min_size) + 1):
        lab = KMeans(k, n_init=N_INIT, random_state=seed).fit_predict(x)
        if len(np.unique(lab)) < k or np.bincount(lab, minlength=k).min() < min_size:
            sil[k] = float("nan")
            continue
        sil[k] = float(silhouette_score(x, lab))
        fits[k] = lab
    if not fits:
        return ModeChoice(1, one, sil, f"no split into modes of >= {min_size} errors: one mode")
    best = max(fits, key=lambda k: (sil[k], -k))
    if sil[best] < min_silhouette:
        return ModeChoice(1, one, sil, f"best silhouette {sil[best]:.2f} at k={best} < {min_silhouette}: one mode")
    return ModeChoice(best, _relabel_by_size(fits[best]), sil,
                      f"silhouette {sil[best]:.2f} at k={best} >= {min_silhouette}")


def cam_centroid_area(maps: np.ndarray, level: float = CAM_LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per map (n, H, W): the mass-weighted centroid (y, x) as fractions of height and width (pixel centres,
    0 = top/left edge, 1 = bottom/right) and the area, the share of pixels above `level` times the map's max.
    An all-zero (or negative) map looks nowhere: NaN for all three."""
    m = np.clip(np.asarray(maps, np.float64), 0, None)
    n, h, w = m.shape
    mass = m.sum(axis=(1, 2))
    ok = mass > 0
    safe = np.where(ok, mass, 1.0)
    cy = (m.sum(axis=2) @ ((np.arange(h) + 0.5) / h)) / safe
    cx = (m.sum(axis=1) @ ((np.arange(w) + 0.5) / w)) / safe
    peak = m.reshape(n, -1).max(axis=1) if n else np.zeros(0)
    area = (m > level * peak[:, None, None]).reshape(n, -1).mean(axis=1) if n else np.zeros(0)
    nan = np.where(ok, 1.0, np.nan)
    return cy * nan, cx * nan, area * nan


def nanmean(values: Optional[np.ndarray]) -> float:
    """Mean of the finite values; NaN when there are none (no RuntimeWarning)."""
    if values is None:
        return float("nan")
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")
