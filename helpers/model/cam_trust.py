"""Can these CAMs be trusted? The model-side pieces of three checks:

- class sensitivity and the randomisation test both compare two stacks of maps by their per-image Spearman rank
  correlation (`rank_correlation`);
- the randomisation test (Adebayo et al., 2018, "Sanity checks for saliency maps") recomputes the CAMs on a copy
  of the model whose head, then head and last block, are re-initialised (`randomised_copy`, `randomisation_test`):
  a map that barely changes does not reflect what the model learned;
- the Sobel edge map (`sobel_maps`) is a baseline that knows nothing about the model: pytorch-grad-cam's own
  tutorial shows an edge detector can beat Grad-CAM on ROAD.

Nothing here alters the model it is given: randomisation happens on a deep copy.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from helpers.model.layers import final_linear

RANDOMISATION_THRESHOLD = 0.5    # median rank correlation above this after randomisation: the map is flagged
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_STAGES = (nn.Sequential, nn.ModuleList)


# ---------------------------------------------------------------------------------------------- comparing maps
def rank_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of a[i] and b[i] over their pixels, per image: (N, H, W) x 2 -> (N,). Ties get
    average ranks, as scipy.stats.spearmanr gives them (ReLU'd CAMs hold many zeros). A constant map has no
    ranking: NaN."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rank_correlation: shapes differ, {a.shape} and {b.shape}")
    n = a.shape[0] if a.ndim else 0
    if n == 0:
        return np.zeros(0)
    ra = stats.rankdata(a.reshape(n, -1), axis=1)
    rb = stats.rankdata(b.reshape(n, -1), axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(axis=1) / np.where(den > 0, den, 1), np.nan)


def scale_like_cam(maps: np.ndarray) -> np.ndarray:
    """Min-max per image into [0, 1], with pytorch-grad-cam's 1e-7 guard (scale_cam_image without resizing)."""
    m = np.asarray(maps, np.float32)
    if not len(m):
        return m.copy()
    flat = m.reshape(len(m), -1)
    lo, hi = flat.min(axis=1)[:, None, None], flat.max(axis=1)[:, None, None]
    return ((m - lo) / (1e-7 + (hi - lo))).astype(np.float32)


def _grayscale(images: np.ndarray) -> np.ndarray:
    """(N, H, W) float64: uint8 NHWC images as luminance in [0, 1] (Rec. 601), or an (N, H, W) stack as it is."""
    x = np.asarray(images)
    if x.ndim == 3:
        return x.astype(np.float64)
    x = x.astype(np.float64) / (255.0 if x.dtype == np.uint8 else 1.0)
    if x.shape[-1] == 3:
        return x @ np.array([0.299, 0.587, 0.114])
    return x.mean(axis=-1)


def sobel_maps(images: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of each image's grayscale, scaled like a CAM: (N, H, W) float32 in [0, 1].
    Borders are mirrored half a pixel out (scipy.ndimage's default 'reflect'), so the map keeps the image's size.
    images: uint8 (N, H, W, C) (luminance in [0, 1]) or float (N, H, W)."""
    y = _grayscale(images)
    if y.ndim != 3:
        raise ValueError(f"sobel_maps needs (N, H, W, C) or (N, H, W) images; got {np.shape(images)}")
    p = np.pad(y, ((0, 0), (1, 1), (1, 1)), mode="symmetric")
    # Separable: a [1, 2, 1] smoothing across the derivative's direction, a [-1, 0, 1] difference along it.
    rows = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]            # smoothed down the rows (H)
    gx = rows[:, :, 2:] - rows[:, :, :-2]                   # d/dx (along W)
    cols = p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]   # smoothed along the columns (W)
    gy = cols[:, 2:] - cols[:, :-2]                         # d/dy (along H)
    return scale_like_cam(np.hypot(gx, gy))


def tie_broken(maps: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each map as its pixels' ranks scaled to [0, 1], equal values ordered by seeded noise: the same order as the
    map wherever it has one, and no ties. Why: pytorch-grad-cam's ROAD keeps the pixels strictly below the map's
    80th percentile, so a map that is 0 on over 80% of its pixels (a sparse ReLU'd CAM, FinerCAM often) keeps
    none and the whole image is imputed, not its top 20%. Only the order matters to ROAD, so this changes nothing
    for a map without ties at its threshold."""
    m = np.asarray(maps, np.float64)
    n = len(m)
    if not n:
        return m.astype(np.float32)
    flat = m.reshape(n, -1)
    noise = np.random.default_rng(seed).random(flat.shape)
    order = np.lexsort((noise, flat), axis=-1)             # by value, then by noise
    ranks = np.empty(flat.shape, np.float64)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(flat.shape[1], dtype=np.float64), flat.shape), axis=1)
    return (ranks / max(flat.shape[1] - 1, 1)).reshape(m.shape).astype(np.float32)


def share_removed(maps: np.ndarray, percentile: float = 80) -> np.ndarray:
    """Share of each map's pixels that ROAD most-relevant-first (pytorch-grad-cam) removes: those not strictly
    below the map's `percentile`. 1 - percentile/100 for a map without ties there; up to 1 for a sparse map."""
    m = np.asarray(maps, np.float64).reshape(len(maps), -1)
    if not len(m):
        return np.zeros(0)
    thr = np.percentile(m, percentile, axis=1)
    return (m >= thr[:, None]).mean(axis=1)


# ---------------------------------------------------------------------------------------------- randomisation
def head_name(model: nn.Module, num_classes: Optional[int] = None) -> Optional[str]:
    """Dotted name of the classifier head (layers.final_linear), or None when the model has no Linear head."""
    head = final_linear(model, num_classes)
    if head is None:
        return None
    return next(n for n, m in model.named_modules() if m is head)


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def last_block_name(model: nn.Module, layer_name: str) -> str:
    """The block the CAM target layer belongs to: the innermost module, the layer itself or one enclosing it,
    that has weights and sits directly in a stage (a Sequential or ModuleList): `layer3.8` for ResNet-56's
    `layer3.8`, `features.3` for a target `features.3.2` (the ReLU of a conv-BN-ReLU block), `blocks.11` for a
    ViT's `blocks.11.norm1`. In a flat stage (VGG's `features.29`, a ReLU): the last child with weights up to the
    target (`features.28`). Otherwise the innermost enclosing module with weights."""
    parts = layer_name.split(".") if layer_name else []
    chain = [".".join(parts[:k]) for k in range(len(parts), 0, -1)]   # the layer, then its ancestors
    for name in chain:
        m = model.get_submodule(name)
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if _has_params(m) and isinstance(parent, _STAGES):
            return name
    for name in chain:
        m = model.get_submodule(name)
        if not _has_params(m):
            continue
        if isinstance(m, _STAGES) and name != layer_name:   # a flat stage: the target is one of its children
            child = parts[len(name.split("."))]
            children = dict(m.named_children())
            keys = list(children)
            before = [k for k in keys[:keys.index(child) + 1] if _has_params(children[k])]
            if before:
                return f"{name}.{before[-1]}"
        return name
    raise ValueError(f"No module with weights contains the target layer {layer_name!r}: nothing to randomise")


def _reinitialise(module: nn.Module) -> None:
    """Fresh random weights in place, drawn from torch's global generator: every submodule with a
    `reset_parameters` gets its own initialisation (Conv/Linear: PyTorch's default uniform; norm layers: weight 1,
    bias 0 and running statistics reset); a parameter no such module owns is redrawn from a normal distribution
    with its trained mean and std, so the scale of the activations stays plausible."""
    covered = set()
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
            covered.update(id(p) for p in m.parameters(recurse=False))
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in covered and p.numel():
                mean, std = p.float().mean(), p.float().std() if p.numel() > 1 else p.float().abs().mean()
                p.copy_(torch.randn(p.shape) * std + mean)


def randomised_copy(model: nn.Module, module_names: Sequence[str], seed: int = 0) -> nn.Module:
    """A deep copy of `model` with the weights of `module_names` (dotted names, in that order) re-initialised;
    `model` itself is untouched and the global random state is restored afterwards. The draws are seeded and made
    on the CPU, so the same names and seed give the same weights on any device, and cascading copies (head, then
    head + block) share the head's new weights."""
    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for name in module_names:
            target = clone.get_submodule(name)
            fresh = copy.deepcopy(target).cpu()    # drawn on the CPU generator, whatever the model's device
            _reinitialise(fresh)
            target.load_state_dict(fresh.state_dict())
    return clone


@dataclass(frozen=True)
class Stage:
    """One step of the cascading randomisation: its label and the modules re-initialised in it."""
    label: str                  # "head", "head + last block"
    modules: tuple[str, ...]


def cascade(model: nn.Module, layer_name: str, num_classes: Optional[int] = None) -> list[Stage]:
    """The cascading randomisation, from the output back: the head alone, then the head and the target layer's
    block (Adebayo et al. randomise from the top layer down). A model without a Linear head gets the block only."""
    head, block = head_name(model, num_classes), last_block_name(model, layer_name)
    stages = []
    if head is not None:
        stages.append(Stage("head", (head,)))
        if block != head and not head.startswith(block + "."):
            stages.append(Stage("head + last block", (head, block)))
    else:
        stages.append(Stage("last block", (block,)))
    return stages


CamFn = Callable[[nn.Module], np.ndarray]   # model -> maps (N, H, W) of the images and classes under test
RANDOMISATION_COLUMNS = ["stage", "randomised", "n_maps", "median_rank_corr", "share_above", "flagged"]


def randomisation_row(stage: Stage, reference: np.ndarray, randomised: np.ndarray,
                      threshold: float = RANDOMISATION_THRESHOLD) -> tuple[dict, np.ndarray]:
    """One stage's verdict and its per-map rank correlations: stage, randomised (module names), n_maps (maps
    with a ranking), median_rank_corr, share_above (share of maps over `threshold`), flagged (median above
    `threshold`: the map barely changed, so it does not reflect what the model learned)."""
    rho = rank_correlation(reference, randomised)
    ok = rho[np.isfinite(rho)]
    med = float(np.median(ok)) if len(ok) else float("nan")
    row = dict(stage=stage.label, randomised=" + ".join(stage.modules), n_maps=int(len(ok)), median_rank_corr=med,
               share_above=float(np.mean(ok > threshold)) if len(ok) else float("nan"),
               flagged=bool(med > threshold))
    return row, rho


def randomisation_test(model: nn.Module, stages: Sequence[Stage], cam_fn: CamFn,
                       reference: Optional[np.ndarray] = None, seed: int = 0,
                       threshold: float = RANDOMISATION_THRESHOLD) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """For every stage: the maps `cam_fn` gives on a randomised copy of `model` against `reference` (default:
    cam_fn(model)). Returns (one randomisation_row per stage, {stage label: randomised maps})."""
    ref = cam_fn(model) if reference is None else np.asarray(reference)
    rows, maps = [], {}
    for st in stages:
        maps[st.label] = cam_fn(randomised_copy(model, st.modules, seed))
        rows.append(randomisation_row(st, ref, maps[st.label], threshold)[0])
    return pd.DataFrame(rows, columns=RANDOMISATION_COLUMNS), maps


# ---------------------------------------------------------------------------------------------- ROAD verdicts
ROAD_COLUMNS = ["method", "target", "n_images", "road", "random", "sobel", "beats_random", "beats_sobel",
                "trustworthy"]


def road_verdict(method: str, target: str, n_images: int, score: float, random_score: float,
                 sobel_score: float) -> dict:
    """A CAM method's ROAD score (most-relevant-first: lower = removing what the map highlights costs the model
    more) beside the two baselines scored on the same images and target. It must beat (be lower than) both
    to be trusted on this data; a NaN never beats anything."""
    beats_random, beats_sobel = bool(score < random_score), bool(score < sobel_score)
    return dict(method=method, target=target, n_images=int(n_images), road=float(score), random=float(random_score),
                sobel=float(sobel_score), beats_random=beats_random, beats_sobel=beats_sobel,
                trustworthy=beats_random and beats_sobel)
