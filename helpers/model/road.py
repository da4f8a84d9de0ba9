"""ROAD's noisy linear imputation (pytorch-grad-cam's NoisyLinearImputer), assembled vectorised and, above
ROAD_MAX_SIDE px, solved on a reduced grid; `road_metric` wraps it in the library's own ROAD metric classes.
Used by helpers.model.faithfulness.faithfulness."""
from __future__ import annotations

import numpy as np
import torch

ROAD_MAX_SIDE = 112
"""Largest side on which ROAD's linear imputation is solved at full resolution. pytorch-grad-cam's imputer solves
one sparse system per image whose size is the removed pixels: at 224 px, 10,000 unknowns and about 0.1 s to solve
(plus 0.07 s to assemble), for each of the few hundred maps an analysis scores. Larger images are imputed on a grid
reduced by an integer factor (RoadImputer)."""

# pytorch-grad-cam's NoisyLinearImputer weights: the 8 neighbours, edges 1/6, corners 1/12.
_ROAD_NEIGHBOURS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12), ((0, -1), 1 / 6),
                    ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))


def road_metric(percentile: int = 80, max_side: int = ROAD_MAX_SIDE):
    """pytorch-grad-cam's ROADMostRelevantFirst(percentile), with RoadImputer in place of its NoisyLinearImputer
    (the same perturbation and scoring classes around it)."""
    from pytorch_grad_cam.metrics.perturbation_confidence import PerturbationConfidenceMetric, RemoveMostRelevantFirst
    return PerturbationConfidenceMetric(RemoveMostRelevantFirst(percentile, RoadImputer(max_side=max_side)))


def _imputation_system(keep: np.ndarray, values: np.ndarray):
    """The equations of NoisyLinearImputer.setup_sparse_system, assembled in one vectorised pass (the library fills
    a lil_matrix entry by entry). keep (h, w): 1 = known pixel; values (C, h, w). For every unknown pixel: its
    value x (1 - weight of the neighbours outside the image) = the weighted sum of its neighbours, the known ones
    moved to the right-hand side. Returns (A csc (n, n), b (n, C)), n = unknown pixels in row-major order."""
    from scipy.sparse import coo_matrix
    h, w = keep.shape
    known = keep.reshape(-1) > 0.5
    unknown = np.flatnonzero(keep.reshape(-1) == 0)
    n = len(unknown)
    var = np.zeros(h * w, np.int64)
    var[unknown] = np.arange(n)
    flat = values.reshape(values.shape[0], -1)
    r0, c0 = unknown // w, unknown % w
    diag = np.ones(n)
    b = np.zeros((n, values.shape[0]))
    rows, cols, vals = [np.arange(n)], [np.arange(n)], []
    for (dy, dx), weight in _ROAD_NEIGHBOURS:
        r, c = r0 + dy, c0 + dx
        inside = (r >= 0) & (c >= 0) & (r < h) & (c < w)
        diag[~inside] -= weight
        eq = np.flatnonzero(inside)
        nb = r[eq] * w + c[eq]
        have = known[nb]
        b[eq[have]] -= weight * flat[:, nb[have]].T
        rows.append(eq[~have])
        cols.append(var[nb[~have]])
        vals.append(np.full(int((~have).sum()), weight))
    a = coo_matrix((np.concatenate([-diag] + vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    return a.tocsc(), b


def _solve_imputation(keep: np.ndarray, values: np.ndarray) -> torch.Tensor:
    """The unknown pixels' values as the library computes them: float32 (n, C), or (n,) for one channel (as
    scipy's spsolve returns it)."""
    from scipy.sparse.linalg import spsolve
    a, b = _imputation_system(keep, values)
    return torch.tensor(spsolve(a, b), dtype=torch.float)


class RoadImputer:
    """pytorch-grad-cam's NoisyLinearImputer (ROAD's noisy linear imputation), faster.

    Up to `max_side` px: the library's equations and noise draws, so the perturbed image is the library's to float
    precision (the system is only assembled vectorised). Larger images: the image is averaged into f x f cells
    (f = ceil(side / max_side)); a cell at least half of whose pixels are kept is known, with the mean of its KEPT
    pixels only, so nothing of the removed pixels reaches the imputation (ROAD's point); the unknown cells are
    solved with the same equations, the grid is upsampled bilinearly, and only the removed pixels take its values,
    plus the library's noise. Kept pixels are never changed. img (C, H, W), mask (H, W): 1 = keep, 0 = impute."""

    def __init__(self, noise: float = 0.01, max_side: int = ROAD_MAX_SIDE):
        self.noise, self.max_side = float(noise), int(max_side)

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        channels, h, w = img.shape
        factor = -(-max(h, w) // self.max_side)
        flat = img.reshape(channels, -1)
        removed = torch.as_tensor(mask).reshape(-1) == 0
        if factor <= 1:   # exactly the library's steps, noise drawn in the same order
            res = _solve_imputation(mask.numpy(), img.numpy())
            out = flat.clone()
            out[:, removed] = res.t() + self.noise * torch.randn_like(res.t())
            return out.reshape_as(img)
        filled = _reduced_grid_fill(img.numpy(), mask.numpy() > 0.5, factor)
        out = flat.clone()
        fill = filled.reshape(channels, -1)[:, removed]
        out[:, removed] = fill + self.noise * torch.randn_like(fill)
        return out.reshape_as(img)


def _reduced_grid_fill(img: np.ndarray, keep: np.ndarray, factor: int) -> torch.Tensor:
    """(C, H, W) float32: the linear imputation solved on `factor` x `factor` cells and upsampled (RoadImputer)."""
    channels, h, w = img.shape
    hs, ws = -(-h // factor), -(-w // factor)
    pad = ((0, hs * factor - h), (0, ws * factor - w))
    x = np.pad(img.astype(np.float64), ((0, 0),) + pad, mode="edge")
    k = np.pad(keep, pad, mode="edge")
    kept = k.reshape(hs, factor, ws, factor).sum(axis=(1, 3))
    sums = (x * k).reshape(channels, hs, factor, ws, factor).sum(axis=(2, 4))
    cells = np.where(kept > 0, sums / np.maximum(kept, 1), 0.0)       # mean of the kept pixels only
    known = 2 * kept >= factor * factor
    grid = torch.as_tensor(cells, dtype=torch.float32).reshape(channels, -1)
    unknown = torch.as_tensor(np.flatnonzero(~known.reshape(-1)))
    if len(unknown):
        grid[:, unknown] = _solve_imputation(known.astype(np.float32), cells).reshape(len(unknown), -1).t()
    up = torch.nn.functional.interpolate(grid.reshape(1, channels, hs, ws), size=(hs * factor, ws * factor),
                                         mode="bilinear", align_corners=False)
    return up[0, :, :h, :w]
