"""Deep-dive computations on a group of confused classes: 2-D feature maps, linear
separability, classifier-head similarity, occlusion attribution and label-issue detection.

These need the model or optional libraries (umap-learn, scikit-learn, captum, cleanlab).
Nothing here draws or writes files.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from helpers.errors import ConfigError, DataError
from helpers.model.layers import final_linear, model_device


# ----------------------------------------------------------------------------- 2-D projection

def _umap_available() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Tensorflow not installed; ParametricUMAP ..." on import
            importlib.import_module("umap")
    except Exception:  # a broken numba install raises more than ImportError
        return False
    return True


def project_2d(features: np.ndarray, seed: int = 0, method: str = "auto") -> tuple[np.ndarray, str]:
    """Embed (N, D) features in 2-D. Returns (coords (N, 2) float32, "UMAP" or "t-SNE").

    method="auto" uses UMAP when umap-learn imports (n_neighbors = min(15, N-1)), else sklearn
    t-SNE (perplexity = min(30, (N-1)/3)); "umap" / "tsne" force one. Fewer than 4 points
    cannot be embedded meaningfully and raise DataError.
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise DataError(f"features must be (N, D), got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise DataError("features contain NaN/inf; the model's penultimate layer produced invalid values.")
    n = len(x)
    if n < 4:
        raise DataError(f"A 2-D projection needs at least 4 images, got {n}; choose classes with more test images.")
    if x.shape[1] < 2:
        x = np.hstack([x, np.zeros((n, 2 - x.shape[1]), np.float32)])  # both methods need >= 2 dims
    method = method.lower().replace("-", "")
    if method not in ("auto", "umap", "tsne"):
        raise ConfigError(f"method must be 'auto', 'umap' or 'tsne', got {method!r}.")
    if method == "umap" and not _umap_available():
        raise ConfigError("method='umap' needs umap-learn: pip install umap-learn (or use method='tsne').")

    if method in ("auto", "umap") and _umap_available():
        import umap

        from helpers.compute.jit_cache import enable_umap_jit_cache
        enable_umap_jit_cache()   # compiled once per environment, not again in every process
        with warnings.catch_warnings():
            # A fixed random_state makes UMAP single-threaded and it warns about that.
            warnings.filterwarnings("ignore", message=".*n_jobs.*", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*precomputed metric.*", category=UserWarning)
            if n < 4096:
                # UMAP's exact path for small data: all pairwise distances. UMAP would get them through sklearn,
                # calling its numba metric from Python once per pair; one vectorised euclidean matrix is the same
                # distances. (Disconnected components are then placed by average linkage instead of centroid
                # distance.)
                from sklearn.metrics import pairwise_distances
                x, metric = pairwise_distances(x.astype(np.float64), metric="euclidean"), "precomputed"
            else:
                metric = "euclidean"
            reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed, n_jobs=1,
                                metric=metric)
            coords = reducer.fit_transform(x)
        return np.asarray(coords, dtype=np.float32), "UMAP"

    from sklearn.manifold import TSNE
    perplexity = min(30.0, (n - 1) / 3.0)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return np.asarray(tsne.fit_transform(x), dtype=np.float32), "t-SNE"


# ----------------------------------------------------------------------------- separability

def separability(features: np.ndarray, labels: np.ndarray, cv: int = 5, seed: int = 0) -> dict:
    """How well a linear classifier separates the classes in feature space.

    Cross-validated accuracy of a standardised LogisticRegression over StratifiedKFold(shuffle, seed), fitted
    with Newton-CG: the same L2-regularised optimum as lbfgs, reached in a few Newton steps (on 3,000 real
    Fashion-MNIST 128-d features, 5 folds: 0.5 s against lbfgs's 3-76 s at max_iter=1000, accuracy equal within
    0.001, well inside the CV std of ~0.01). Folds are reduced to the smallest class size; with a class
    of fewer than 2 images, or fewer than 2 classes, accuracy is NaN and `note` says why.
    Returns accuracy, std (across folds), n, chance (majority-class share), folds, note.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y):
        raise DataError(f"features (N, D) and labels (N,) must match, got {x.shape} and {y.shape}.")
    n = len(y)
    classes, counts = np.unique(y, return_counts=True)
    chance = float(counts.max() / n) if n else float("nan")
    result = {"accuracy": float("nan"), "std": float("nan"), "n": int(n), "chance": chance,
              "folds": 0, "note": ""}
    if len(classes) < 2:
        result["note"] = "fewer than 2 classes present"
        return result
    if counts.min() < 2:
        small = [str(c) for c, k in zip(classes, counts) if k < 2]
        result["note"] = f"class(es) {', '.join(small)} have fewer than 2 images"
        return result
    folds = int(min(cv, counts.min()))
    model = make_pipeline(StandardScaler(), LogisticRegression(solver="newton-cg", max_iter=100))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Perfectly separable data can stop before convergence; the accuracy is still exact.
        warnings.filterwarnings("ignore", category=UserWarning)
        from sklearn.exceptions import ConvergenceWarning
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        scores = cross_val_score(model, x, y, cv=splitter)
    result.update(accuracy=float(scores.mean()), std=float(scores.std()), folds=folds)
    if folds < cv:
        result["note"] = f"{folds} folds (smallest class has {counts.min()} images)"
    return result


# ----------------------------------------------------------------------------- classifier head

def head_cosine_similarity(model: nn.Module, class_ids: Sequence[int],
                           num_classes: Optional[int] = None) -> Optional[np.ndarray]:
    """(k, k) cosine similarity between the final Linear's weight rows of class_ids, or None
    when the model has no such Linear. Similar rows mean the head scores those classes alike."""
    head = final_linear(model, num_classes)
    if head is None:
        return None
    ids = [int(c) for c in class_ids]
    if any(c < 0 or c >= head.out_features for c in ids):
        raise ConfigError(f"class ids {ids} are outside the head's {head.out_features} outputs.")
    w = head.weight.detach().to(torch.float64).cpu()[ids]
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (w @ w.T).numpy()


def max_off_diagonal(matrix: np.ndarray) -> tuple[float, tuple[int, int]]:
    """Largest off-diagonal value of a square matrix and its (row, col) position."""
    m = np.array(matrix, dtype=np.float64)
    if m.shape[0] < 2:
        return float("nan"), (-1, -1)
    np.fill_diagonal(m, -np.inf)
    r, c = np.unravel_index(np.argmax(m), m.shape)
    return float(m[r, c]), (int(r), int(c))


# ----------------------------------------------------------------------------- occlusion

def default_occlusion_window(height: int, width: int) -> int:
    """About 1/8 of the shorter side (4 px on 32 px images), at least 1."""
    return max(1, int(round(min(height, width) / 8)))


def occlusion_attribution(model: nn.Module, inputs: torch.Tensor, targets, window: Optional[int] = None,
                          stride: Optional[int] = None, perturbations_per_eval: int = 16) -> np.ndarray:
    """Occlusion sensitivity (captum.attr.Occlusion): (N, H, W) float32, summed over channels.

    Each window x window patch (all channels) is replaced by 0, i.e. the mean colour of normalised
    inputs; the value at a pixel is the average drop of the target logit over the patches that
    cover it (positive = the region supports the target). window defaults to ~1/8 of the side and
    stride to the window: non-overlapping patches give an 8x8 map, the resolution of a CIFAR ResNet's
    last-stage CAM, for 64 forward passes per image (a half-window stride costs 225 for a smoother
    map). The model is used as given (put it in eval mode first).
    Use normalise01() for display.
    """
    from captum.attr import Occlusion

    if inputs.ndim != 4:
        raise DataError(f"inputs must be (N, C, H, W), got shape {tuple(inputs.shape)}.")
    n, channels, height, width = inputs.shape
    window = window or default_occlusion_window(height, width)
    if window > min(height, width):
        raise ConfigError(f"occlusion window {window} is larger than the {height}x{width} image.")
    stride = stride or window
    device = model_device(model)
    target = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=device).reshape(-1)
    if len(target) != n:
        raise DataError(f"targets has {len(target)} entries for {n} inputs.")
    attr = Occlusion(model).attribute(
        inputs.to(device), sliding_window_shapes=(channels, window, window),
        strides=(channels, stride, stride), baselines=0, target=target,
        perturbations_per_eval=perturbations_per_eval)
    return attr.detach().sum(dim=1).cpu().numpy().astype(np.float32)


def normalise01(maps: np.ndarray) -> np.ndarray:
    """Min-max scale each map (leading axis = map index) to [0, 1]; constant maps become 0."""
    m = np.asarray(maps, dtype=np.float32)
    flat = m.reshape(len(m), -1)
    lo = flat.min(axis=1, keepdims=True)
    span = flat.max(axis=1, keepdims=True) - lo
    out = np.where(span > 0, (flat - lo) / np.where(span > 0, span, 1.0), 0.0)
    return out.reshape(m.shape).astype(np.float32)


# ----------------------------------------------------------------------------- label issues

def cleanlab_label_issues(labels: np.ndarray, probs: np.ndarray) -> Optional[np.ndarray]:
    """Indices cleanlab flags as likely label errors, most suspicious (lowest self-confidence)
    first; None when cleanlab is not installed.

    Approximate here: confident learning expects out-of-sample probabilities, and a model's
    test-set predictions are only out-of-sample if it never trained on those images; it also
    finds fewer issues when few images per class are analysed.
    """
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        return None
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) != len(y):
        raise DataError(f"probs must be (N={len(y)}, C), got {p.shape}.")
    p = p / p.sum(axis=1, keepdims=True)  # float32 softmax rows may miss 1 by rounding
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")  # e.g. "class X has no examples" on subsets
        found = find_label_issues(y, p, return_indices_ranked_by="self_confidence", n_jobs=1)
    return np.asarray(found, dtype=np.int64)
