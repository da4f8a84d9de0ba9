"""Nearest neighbours by cosine similarity of penultimate features, and what they show about the training set:
training images whose neighbours are mostly another class, and test images with a near-duplicate in training.

The search is exact either way: blocked matrix products in torch (a block of queries against a block of the
base at a time, keeping the top k per query, so memory stays bounded whatever the sizes), or faiss'
IndexFlatIP when faiss is installed and the base is large.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch

TORCH_SEARCH = "torch blocked matmul"
FAISS_SEARCH = "faiss IndexFlatIP"
FAISS_MIN_BASE = 20_000   # below this the torch search is as fast, and needs no second OpenMP runtime
QUERY_BLOCK = 1024
BASE_BLOCK = 8192         # a block of similarities is QUERY_BLOCK x BASE_BLOCK float32: 32 MB


@dataclass
class Neighbours:
    index: np.ndarray        # (Q, k) int64 rows of the base, most similar first; -1 where the base has fewer
    similarity: np.ndarray   # (Q, k) float32 cosine similarity; NaN where index is -1
    search: str              # which search ran: TORCH_SEARCH or FAISS_SEARCH


def faiss_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("faiss") is not None


def l2_normalise(x) -> np.ndarray:
    """Rows scaled to unit length, as float32 (all-zero rows stay zero: similarity 0 to everything)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _torch_search(q: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    qt, bt = torch.from_numpy(q), torch.from_numpy(b)
    sims_out, idx_out = [], []
    for qs in range(0, len(q), QUERY_BLOCK):
        qb = qt[qs:qs + QUERY_BLOCK]
        best_s = torch.full((len(qb), 0), -np.inf)
        best_i = torch.zeros((len(qb), 0), dtype=torch.int64)
        for bs in range(0, len(b), BASE_BLOCK):
            s = qb @ bt[bs:bs + BASE_BLOCK].T
            top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)
            # merge with the best so far: the top k of the union is the top k of the two top-k lists
            cat_s, cat_i = torch.cat([best_s, top_s], 1), torch.cat([best_i, top_i + bs], 1)
            best_s, pick = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
            best_i = cat_i.gather(1, pick)
        sims_out.append(best_s)
        idx_out.append(best_i)
    return torch.cat(sims_out).numpy(), torch.cat(idx_out).numpy()


def _faiss_search(q: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss
    index = faiss.IndexFlatIP(b.shape[1])
    index.add(np.ascontiguousarray(b))
    sims, idx = index.search(np.ascontiguousarray(q), k)
    return sims.astype(np.float32), idx.astype(np.int64)


def nearest(queries, base, k: int, exclude: Optional[np.ndarray] = None, method: str = "auto") -> Neighbours:
    """The k rows of `base` most cosine-similar to each row of `queries` (both (n, D) features; normalised
    here). `exclude` (Q,): a base row to leave out for each query (its own row when the queries are part of
    the base; -1 for none). method: "auto" (faiss when installed and the base has FAISS_MIN_BASE rows or
    more, else torch), "torch" or "faiss"."""
    q, b = l2_normalise(queries), l2_normalise(base)
    if q.ndim != 2 or b.ndim != 2 or (len(q) and len(b) and q.shape[1] != b.shape[1]):
        raise ValueError(f"queries and base must be (n, D) with the same D, got {q.shape} and {b.shape}")
    if method == "auto":
        method = "faiss" if len(b) >= FAISS_MIN_BASE and faiss_available() else "torch"
    if method not in ("torch", "faiss"):
        raise ValueError(f"method must be 'auto', 'torch' or 'faiss', got {method!r}")
    search = FAISS_SEARCH if method == "faiss" else TORCH_SEARCH
    extra = 1 if exclude is not None else 0
    kk = min(k + extra, len(b))
    if len(q) == 0 or kk == 0:
        sims, idx = np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    else:
        sims, idx = (_faiss_search if method == "faiss" else _torch_search)(q, b, kk)
    if exclude is not None and idx.shape[1]:
        sims, idx = _drop_excluded(sims, idx, np.asarray(exclude, dtype=np.int64), k)
    pad = k - idx.shape[1]
    if pad > 0:
        idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
        sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=np.nan)
    return Neighbours(index=idx.astype(np.int64), similarity=sims.astype(np.float32), search=search)


def _drop_excluded(sims: np.ndarray, idx: np.ndarray, exclude: np.ndarray, k: int):
    """Remove each query's excluded row (or, when it is not among the results, the last one) and keep k."""
    hit = idx == exclude[:, None]
    drop = np.where(hit.any(axis=1), hit.argmax(axis=1), idx.shape[1] - 1)
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(len(idx)), drop] = False
    width = idx.shape[1] - 1
    return sims[keep].reshape(-1, width)[:, :k], idx[keep].reshape(-1, width)[:, :k]


def nearest_in_class(queries, base, base_labels, cls: int, k: int, method: str = "auto") -> Neighbours:
    """`nearest` restricted to the base rows of class `cls`; the indices are rows of the whole base."""
    rows = np.flatnonzero(np.asarray(base_labels) == cls)
    found = nearest(queries, np.asarray(base)[rows], k, method=method)
    index = np.where(found.index >= 0, rows[np.clip(found.index, 0, None)] if len(rows) else -1, -1)
    return Neighbours(index=index.astype(np.int64), similarity=found.similarity, search=found.search)


# ---------------------------------------------------------------------------------------------- ambiguous training
def ambiguous_training(labels, neighbour_index: np.ndarray, rows: np.ndarray, other: int,
                       majority: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Of the training images `rows` (with `neighbour_index`, their k nearest training neighbours, themselves
    excluded), those whose neighbours are more than `majority` of class `other`: (their rows, the share of
    `other` among their neighbours), the most ambiguous first."""
    labels = np.asarray(labels)
    nb = np.asarray(neighbour_index)
    valid = nb >= 0
    counts = ((labels[np.clip(nb, 0, None)] == other) & valid).sum(axis=1)
    share = counts / np.maximum(valid.sum(axis=1), 1)
    mask = share > majority
    order = np.argsort(-share[mask], kind="stable")
    return np.asarray(rows)[mask][order], share[mask][order]


# ---------------------------------------------------------------------------------------------- near-duplicates
PIXEL_MAX_SIDE = 64   # images larger than this are compared at 64x64; smaller ones at their own size
MAX_SHIFT = 2         # pixels a copy may be shifted by and still count as the same picture


def _gray_tensor(images: np.ndarray, max_side: int) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).float().mean(dim=-1, keepdim=True).permute(0, 3, 1, 2)
    if max(x.shape[-2:]) > max_side:
        x = torch.nn.functional.interpolate(x, size=(max_side, max_side), mode="area")
    return x[:, 0]


def gray_thumbnails(images: np.ndarray, max_side: int = PIXEL_MAX_SIDE) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, h, w) gray in 0..255 (mean of the channels): at the images' own size
    when it fits in max_side (a resize would turn a 1 px shift into a blur), else area-resized to max_side."""
    return _gray_tensor(images, max_side).numpy()


def pixel_distance(a: np.ndarray, b: np.ndarray, max_shift: int = MAX_SHIFT) -> np.ndarray:
    """Mean absolute gray difference (0..255) of thumbnail pairs a[i], b[i] (N, H, W), minimised over shifts of
    b by up to `max_shift` pixels each way (compared on the overlap): a copy moved by a pixel or two is still
    a copy. In torch: its element-wise operations use every core."""
    ta, tb = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    n, h, w = ta.shape
    best = torch.full((n,), float("inf"))
    m = max_shift
    for dy in range(-m, m + 1):
        for dx in range(-m, m + 1):
            ya, yb = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
            xa, xb = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
            d = (ta[:, ya, xa] - tb[:, yb, xb]).abs_().mean(dim=(1, 2))
            best = torch.minimum(best, d)
    return best.numpy()


FFT_KEEP = 8   # low spatial frequencies kept per axis in the shift-invariant pixel descriptor


def shift_invariant_descriptor(images: np.ndarray, keep: int = FFT_KEEP) -> np.ndarray:
    """(N, 2*keep*keep - keep) magnitudes of the lowest 2-D Fourier frequencies of the gray thumbnails: a
    magnitude spectrum ignores (cyclic) shifts, so a copy moved by a pixel or two keeps its descriptor, where
    raw pixels and a weak model's features both move it behind other look-alikes (on Fashion-MNIST a 1 px shift
    leaves the original the nearest raw-pixel neighbour for a third of the copies, the descriptor for 95%+)."""
    parts = []
    for s in range(0, len(images), 2048):
        spec = torch.fft.rfft2(_gray_tensor(images[s:s + 2048], PIXEL_MAX_SIDE)).abs().numpy()
        k = min(keep, spec.shape[1] // 2, spec.shape[2])
        # non-negative and negative vertical frequencies (rfft2 keeps only non-negative horizontal ones)
        parts.append(np.concatenate([spec[:, :k, :k].reshape(len(spec), -1),
                                     spec[:, -k + 1:, :k].reshape(len(spec), -1) if k > 1 else spec[:, :0, 0]], 1))
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)


def near_duplicate_candidates(test_features, train_features, test_images: np.ndarray, train_images: np.ndarray,
                              feature_min: float, k: int = 10, pixel_k: int = 10,
                              method: str = "auto") -> tuple[pd.DataFrame, str]:
    """Training images that may be near-duplicates of test images, proposed two ways: the k nearest by the
    model's features (cosine >= feature_min) and the pixel_k nearest by the shift-invariant pixel descriptor
    (centred cosine); each proposal is measured in pixel space (pixel_distance). Returns (the closest proposal
    per test image: test_index, train_index, feature_similarity (model features, whichever way it was proposed),
    pixel_distance, proposed_by ("features", "pixels" or "both"); the searches that ran). Confirming is the
    caller's threshold on pixel_distance."""
    found = nearest(test_features, train_features, k, method=method)
    q_f, s_f = np.nonzero((found.index >= 0) & (found.similarity >= feature_min))
    searches = {found.search}
    pairs = [np.stack([q_f, found.index[q_f, s_f], np.zeros_like(q_f)], 1)]
    if pixel_k:
        desc_test, desc_train = shift_invariant_descriptor(test_images), shift_invariant_descriptor(train_images)
        centre = desc_train.mean(axis=0)
        px = nearest(desc_test - centre, desc_train - centre, pixel_k, method=method)
        searches.add(px.search)
        q_p, s_p = np.nonzero(px.index >= 0)
        pairs.append(np.stack([q_p, px.index[q_p, s_p], np.ones_like(q_p)], 1))
    allp = np.concatenate(pairs).astype(np.int64)
    if not len(allp):
        return pd.DataFrame({"test_index": pd.Series(dtype=np.int64), "train_index": pd.Series(dtype=np.int64),
                             "feature_similarity": pd.Series(dtype=float), "pixel_distance": pd.Series(dtype=float),
                             "proposed_by": pd.Series(dtype=str)}), " and ".join(sorted(searches))
    # one row per (test, train) pair, remembering which search proposed it
    uniq, inverse = np.unique(allp[:, :2], axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    ways = np.zeros((len(uniq), 2), dtype=bool)
    ways[inverse, allp[:, 2]] = True
    q_rows, t_rows = uniq[:, 0], uniq[:, 1]
    dist = np.empty(len(uniq), dtype=np.float32)
    for s in range(0, len(uniq), 4096):   # thumbnails of one chunk of candidate pairs at a time
        part = slice(s, s + 4096)
        dist[part] = pixel_distance(gray_thumbnails(test_images[q_rows[part]]),
                                    gray_thumbnails(train_images[t_rows[part]]))
    fq, ft = l2_normalise(np.asarray(test_features)[q_rows]), l2_normalise(np.asarray(train_features)[t_rows])
    df = pd.DataFrame({"test_index": q_rows, "train_index": t_rows,
                       "feature_similarity": (fq * ft).sum(axis=1).astype(float), "pixel_distance": dist.astype(float),
                       "proposed_by": np.where(ways.all(axis=1), "both", np.where(ways[:, 0], "features", "pixels"))})
    df = df.sort_values(["test_index", "pixel_distance"], kind="stable").drop_duplicates("test_index")
    return df.reset_index(drop=True), " and ".join(sorted(searches))
