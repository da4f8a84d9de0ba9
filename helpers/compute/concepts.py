"""Contrastive concepts: the target layer's non-negative activations of the confused group's images factorised
by NMF into K concepts (A ≈ W·H: pixels × concepts times concepts × channels), and each image's logit margin
z_B − z_A split over those concepts.

For a GAP→Linear head the split is exact: z_B − z_A = (w_B − w_A)·mean_pixels(A) + (b_B − b_A), and with
A = W·H + R (R: what NMF does not reconstruct, including any negative activations it never saw)

    z_B − z_A = Σ_k c_k + residual + offset,   c_k = mean_pixels(W[:, k]) · (H_k · (w_B − w_A)),
    residual = (w_B − w_A) · mean_pixels(R),   offset = b_B − b_A.

For any other head the same sums are taken with the gradient g = ∂(z_B − z_A)/∂A in place of (w_B − w_A)/pixels
(gradient × activation per concept), and `offset` = margin − Σ g·A is what that first-order view leaves out:
an approximation, marked `exact=False`. On a GAP→Linear head both give the same numbers.

K: the smallest K in K_RANGE whose NMF explains EXPLAINED_TARGET of the activations' energy
(1 − ‖A − WH‖² / ‖A‖²); when none does, the K with the largest explained share.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

K_RANGE = tuple(range(4, 9))
EXPLAINED_TARGET = 0.80     # measured on FashionCNN's 32-channel 7x7 layer: 71% at K=4 .. 84% at K=8
FIT_ROWS = 8_000         # pixels NMF is fitted on (seeded sample); every pixel is then encoded with H fixed
NMF_MAX_ITER = 200
NMF_TOL = 1e-3           # ranking concepts needs no tighter fit; 1e-4 cost ~3x the time


@dataclass
class Factors:
    """NMF of the activations (N, C, h, w): `basis` H (K, C), `amounts` W as (N, h, w, K)."""
    basis: np.ndarray
    amounts: np.ndarray
    k: int
    explained: dict = field(default_factory=dict)   # K tried -> explained share on the fitted pixels
    how: str = ""                                   # how K was chosen, as a sentence

    def reconstruction(self) -> np.ndarray:
        """W·H back as (N, C, h, w)."""
        return np.einsum("nyxk,kc->ncyx", self.amounts, self.basis)


def pixel_rows(acts: np.ndarray) -> np.ndarray:
    """(N, C, h, w) -> (N·h·w, C) rows, image-major then row-major pixels (the order `amounts` is reshaped in)."""
    a = np.asarray(acts)
    return a.transpose(0, 2, 3, 1).reshape(-1, a.shape[1])


def explained_share(x: np.ndarray, w: np.ndarray, h: np.ndarray) -> float:
    """1 − ‖x − w·h‖² / ‖x‖²."""
    total = float(np.square(x, dtype=np.float64).sum())
    return 1.0 - float(np.square(x - w @ h, dtype=np.float64).sum()) / total if total > 0 else 1.0


def fit_nmf(x: np.ndarray, k: int, seed: int = 0, max_iter: int = NMF_MAX_ITER, tol: float = NMF_TOL):
    """scikit-learn's NMF (NNDSVDa init, coordinate descent, Frobenius loss) of non-negative rows x: (model, W)."""
    from sklearn.decomposition import NMF
    import warnings
    from sklearn.exceptions import ConvergenceWarning

    model = NMF(n_components=int(k), init="nndsvda", random_state=int(seed), max_iter=int(max_iter), tol=float(tol))
    with warnings.catch_warnings():   # a few hundred iterations are plenty for ranking concepts
        warnings.simplefilter("ignore", ConvergenceWarning)
        w = model.fit_transform(x)
    return model, w


def factorise(acts: np.ndarray, k: Optional[int] = None, seed: int = 0, ks: Sequence[int] = K_RANGE,
              target: float = EXPLAINED_TARGET, fit_rows: int = FIT_ROWS) -> Factors:
    """NMF of max(acts, 0) (N, C, h, w) into K concepts; K given, or chosen as the module docstring says.
    NMF is fitted on at most `fit_rows` pixels (seeded sample) and every pixel then encoded with H fixed."""
    import warnings
    from sklearn.exceptions import ConvergenceWarning

    acts = np.asarray(acts, np.float32)
    n, c, hh, ww = acts.shape
    rows = np.maximum(pixel_rows(acts), 0)
    fit = rows
    if len(rows) > fit_rows:
        pick = np.sort(np.random.default_rng(seed).choice(len(rows), fit_rows, replace=False))
        fit = rows[pick]
    explained, models, fitted = {}, {}, {}
    candidates = [int(k)] if k is not None else [int(v) for v in ks]
    for kk in candidates:
        kk = max(1, min(kk, c, len(fit)))
        model, w = fit_nmf(fit, kk, seed)
        models[kk], fitted[kk] = model, w
        explained[kk] = explained_share(fit, w, model.components_)
        if k is None and explained[kk] >= target:
            break
    if k is not None:
        chosen = next(iter(models))
        how = f"K={chosen} as given"
    else:
        reached = [kk for kk, e in explained.items() if e >= target]
        chosen = reached[0] if reached else max(explained, key=explained.get)
        how = (f"K={chosen}: the smallest K in {min(ks)}..{max(ks)} whose NMF explains ≥{target:.0%} of the "
               f"activations' energy ({explained[chosen]:.1%})" if reached else
               f"K={chosen}: no K in {min(ks)}..{max(ks)} explains {target:.0%} of the activations' energy; "
               f"the best ({explained[chosen]:.1%})")
    model = models[chosen]
    if fit is rows:   # every pixel was fitted: keep the fit's own W (what sklearn's fit_transform returns)
        w_all = fitted[chosen]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            w_all = model.transform(rows)
    return Factors(basis=model.components_.astype(np.float64), amounts=w_all.reshape(n, hh, ww, -1).astype(np.float64),
                   k=int(chosen), explained=explained, how=how)


# ----------------------------------------------------------------------------- margin split

@dataclass
class MarginSplit:
    """Per image (for its own pair A → B): margin = contributions.sum(1) + residual + offset."""
    contributions: np.ndarray   # (n, K) c_k, in logit units
    residual: np.ndarray        # (n,) the part of the activations NMF does not reconstruct
    offset: np.ndarray          # (n,) b_B − b_A (exact) or margin − Σ g·A (approximate)
    margin: np.ndarray          # (n,) z_B − z_A from the model's logits
    exact: bool


def gap_linear_split(acts: np.ndarray, factors: Factors, weight: np.ndarray, bias: Optional[np.ndarray],
                     true: np.ndarray, pred: np.ndarray, logits: np.ndarray, rows: Optional[np.ndarray] = None
                     ) -> MarginSplit:
    """The exact split for a GAP→Linear head (weight (classes, C), bias (classes,)). `rows` picks which of
    factors' images `acts` are (default: all, in order); true/pred: each image's A and B; logits: the model's."""
    rows = np.arange(len(acts)) if rows is None else np.asarray(rows)
    a = np.asarray(acts, np.float64)
    wgt = np.asarray(weight, np.float64)
    d = wgt[pred] - wgt[true]                                        # (n, C)
    mean_w = factors.amounts[rows].mean(axis=(1, 2))                 # (n, K)
    contrib = mean_w * (d @ factors.basis.T)                         # (n, K)
    mean_r = a.mean(axis=(2, 3)) - mean_w @ factors.basis            # (n, C)
    residual = (d * mean_r).sum(1)
    b = np.zeros(wgt.shape[0]) if bias is None else np.asarray(bias, np.float64)
    lg = np.asarray(logits, np.float64)
    n = np.arange(len(a))
    return MarginSplit(contributions=contrib, residual=residual, offset=b[pred] - b[true],
                       margin=lg[n, pred] - lg[n, true], exact=True)


def margin_gradients(model: nn.Module, layer: nn.Module, x: torch.Tensor, true: np.ndarray, pred: np.ndarray,
                     reshape=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(activations (n, C, h, w), ∂(z_B − z_A)/∂activations, logits) of `layer` for inputs x, one backward pass.
    `reshape` (a pytorch-grad-cam reshape_transform) maps a token layer's output and gradient to (n, C, h, w).
    The layer's output is swapped for a leaf, so the backward pass stops there instead of running down to the
    input; the model goes on with a copy (an in-place op after the layer must not change the leaf)."""
    store = {}

    def hook(m, i, o):
        store["a"] = o.detach().requires_grad_(True)
        return store["a"].clone()

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(x.detach())
            n = torch.arange(len(x))
            t, p = torch.as_tensor(true, dtype=torch.long), torch.as_tensor(pred, dtype=torch.long)
            (grad,) = torch.autograd.grad((logits[n, p] - logits[n, t]).sum(), store["a"])
    finally:
        handle.remove()
    act = store["a"].detach()
    if reshape is not None:
        act, grad = reshape(act), reshape(grad)
    return act.float().cpu().numpy(), grad.float().cpu().numpy(), logits.detach().float().cpu().numpy()


def gradient_split(acts: np.ndarray, grads: np.ndarray, factors: Factors, true: np.ndarray, pred: np.ndarray,
                   logits: np.ndarray, rows: Optional[np.ndarray] = None) -> MarginSplit:
    """Gradient × activation per concept (any head): approximate, `offset` holds what the linear view misses."""
    rows = np.arange(len(acts)) if rows is None else np.asarray(rows)
    a, g = np.asarray(acts, np.float64), np.asarray(grads, np.float64)
    w = factors.amounts[rows]                                        # (n, h, w, K)
    gh = np.einsum("ncyx,kc->nyxk", g, factors.basis)                # g · H_k per pixel
    contrib = (w * gh).sum(axis=(1, 2))
    recon = np.einsum("nyxk,kc->ncyx", w, factors.basis)
    residual = (g * (a - recon)).sum(axis=(1, 2, 3))
    lg = np.asarray(logits, np.float64)
    n = np.arange(len(a))
    margin = lg[n, pred] - lg[n, true]
    return MarginSplit(contributions=contrib, residual=residual, offset=margin - (g * a).sum(axis=(1, 2, 3)),
                       margin=margin, exact=False)


# ----------------------------------------------------------------------------- patches

@dataclass(frozen=True)
class PatchBox:
    """One top patch of a concept: image `image` (an index into the test set), box [y0, y1) × [x0, x1) in input
    pixels around the feature cell (cy, cx) where the concept is strongest in that image."""
    concept: int
    image: int
    y0: int
    x0: int
    y1: int
    x1: int
    value: float     # the concept's amount at that cell
    cy: int = -1     # the peak feature cell, and the feature map's size (-1: unknown)
    cx: int = -1
    map_h: int = -1
    map_w: int = -1

    @property
    def in_corner(self) -> bool:
        """The peak cell touches one edge of a feature map of at least 5x5 within one cell of a corner: a 4x4
        corner patch on 28-px Fashion-MNIST peaks at cell (1, 0) of the 7x7 map (the padded convolutions
        shift it), a garment's shoulder at (1, 1) and its collar at (0, 3)."""
        if self.map_h < 5 or self.map_w < 5 or self.cy < 0:
            return False
        dy, dx = min(self.cy, self.map_h - 1 - self.cy), min(self.cx, self.map_w - 1 - self.cx)
        return (dy == 0 and dx <= 1) or (dx == 0 and dy <= 1)


def top_patches(amounts: np.ndarray, images: np.ndarray, concept: int, n: int, input_hw: tuple[int, int],
                pad_cells: int = 1) -> list[PatchBox]:
    """The n images where `concept` peaks highest (one patch per image), each as the box of its peak feature
    cell widened by `pad_cells` cells on each side (the cell alone is a few pixels on a small map)."""
    a = np.asarray(amounts)[..., concept]                            # (N, h, w)
    nimg, hh, ww = a.shape
    flat = a.reshape(nimg, -1)
    peak = flat.argmax(1)
    best = flat[np.arange(nimg), peak]
    order = np.argsort(-best, kind="stable")[:n]
    sy, sx = input_hw[0] / hh, input_hw[1] / ww
    out = []
    for i in order:
        if not best[i] > 0:
            break
        cy, cx = divmod(int(peak[i]), ww)
        y0, x0 = int(np.floor((cy - pad_cells) * sy)), int(np.floor((cx - pad_cells) * sx))
        y1, x1 = int(np.ceil((cy + 1 + pad_cells) * sy)), int(np.ceil((cx + 1 + pad_cells) * sx))
        out.append(PatchBox(concept=int(concept), image=int(images[i]), y0=max(0, y0), x0=max(0, x0),
                            y1=min(input_hw[0], y1), x1=min(input_hw[1], x1), value=float(best[i]),
                            cy=cy, cx=cx, map_h=hh, map_w=ww))
    return out


def box_overlap(box: PatchBox, y0: int, x0: int, y1: int, x1: int) -> int:
    """Pixels shared by `box` and the region [y0, y1) × [x0, x1)."""
    return max(0, min(box.y1, y1) - max(box.y0, y0)) * max(0, min(box.x1, x1) - max(box.x0, x0))


def strength_ratio(amounts: np.ndarray, in_b: np.ndarray, in_errors: np.ndarray, concept: int) -> float:
    """The concept's mean amount in images `in_b` relative to images `in_errors` (boolean masks over amounts)."""
    m = np.asarray(amounts)[..., concept].mean(axis=(1, 2))
    if not in_b.any() or not in_errors.any():
        return float("nan")
    err = m[in_errors].mean()
    return float(m[in_b].mean() / err) if err > 0 else float("inf")
