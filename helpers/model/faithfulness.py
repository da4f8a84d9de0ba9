"""Faithfulness of attribution maps: pytorch-grad-cam's ROAD (the imputer in road.py) and confidence-change
metrics, scored for the targets a step asks about. Split out of cams.py, which re-exports it."""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from torch import nn
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

from helpers.errors import ConfigError, DataError
from helpers.model.layers import eval_mode, model_device, weight_dtype
from helpers.model.road import road_metric


FAITHFULNESS_METRICS = ("road", "confidence_change")


class SoftmaxContrastTarget:
    """pytorch-grad-cam target: softmax(output)[true] - softmax(output)[pred], the margin FinerCAM explains
    (in probabilities, so it reads on the same scale as the single-class ROAD scores)."""

    def __init__(self, true_class: int, pred_class: int):
        self.true_class, self.pred_class = int(true_class), int(pred_class)

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(model_output, dim=-1)
        return p[..., self.true_class] - p[..., self.pred_class]


def faithfulness(model: nn.Module, inputs: torch.Tensor, targets, cams: np.ndarray, metric: str = "road",
                 batch_size: int = 64, seed: int = 0, scores_before: Optional[np.ndarray] = None,
                 percentile: int = 80) -> np.ndarray:
    """Per-image faithfulness score (N,) of `cams` for the target of each image, from pytorch-grad-cam's
    metrics. Both are score_after - score_before, the change of the target's score:

    - "road" (ROADMostRelevantFirst(percentile)): the (100 - percentile)% of pixels with the highest CAM
      values are replaced by noisy linear interpolation of their neighbours. NEGATIVE = the score dropped when
      the highlighted pixels were removed, so the CAM points at evidence the model really uses; more negative
      is more faithful; ~0 means the highlighted pixels did not matter. The noise is seeded by `seed`. Up to
      road.ROAD_MAX_SIDE px the imputation is the library's to float precision; above, it is solved on a reduced
      grid (helpers.model.road.RoadImputer), the same for every map scored, so maps and baselines stay comparable.
    - "confidence_change" (CamMultImageConfidenceChange): the normalised input is multiplied by the CAM
      (un-highlighted pixels go to the dataset mean). ~0 or positive = the highlighted pixels alone keep the
      prediction, so the CAM covers the evidence; strongly negative = evidence lies outside the CAM.

    targets: one pytorch-grad-cam target per image (a callable on the model output, e.g.
    ClassifierOutputSoftmaxTarget(c), or SoftmaxContrastTarget(true, pred) for maps that explain "true rather
    than predicted": then NEGATIVE = removing the pixels moves the model from the true class to the predicted
    one), or class ids, which score their softmax probability (in [-1, 1]).
    scores_before: the targets' scores on the unperturbed `inputs` when already known (the analysis has the
    probabilities from its inference pass); the metric then runs the model on the perturbed images only.
    """
    key = str(metric).strip().lower()
    if key not in FAITHFULNESS_METRICS:
        raise ConfigError(f"Unknown faithfulness metric {metric!r}. Choose one of: {', '.join(FAITHFULNESS_METRICS)}.")
    x = torch.as_tensor(inputs).float()
    n = x.shape[0]
    maps = np.ascontiguousarray(np.asarray(cams, dtype=np.float32))
    if maps.shape != (n,) + tuple(x.shape[-2:]):
        raise DataError(f"cams must be (N, H, W) = {(n,) + tuple(x.shape[-2:])}; got {maps.shape}.")
    metric_targets = _metric_targets(targets, n)
    if weight_dtype(model) != torch.float32:   # the metrics turn the targets' scores into NumPy: no bfloat16
        metric_targets = [_Float32Target(t) for t in metric_targets]
    before = _check_scores_before(scores_before, n)
    scorer = road_metric(percentile) if key == "road" else CamMultImageConfidenceChange()
    device = model_device(model)
    out = np.zeros(n, np.float32)
    with eval_mode(model), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # ROAD's imputer calls numpy functions on torch tensors (library-internal NumPy 2 deprecation).
        warnings.filterwarnings("ignore", message="__array_wrap__ must accept context", category=DeprecationWarning)
        torch.manual_seed(seed)
        for s in range(0, n, int(batch_size)):
            e = min(s + int(batch_size), n)
            out[s:e] = _perturbation_score(scorer, x[s:e].to(device), maps[s:e], metric_targets[s:e], model,
                                           None if before is None else before[s:e])
    return out


class _Float32Target:
    """A target scored on the float32 output of a float16/bfloat16 model."""

    def __init__(self, target):
        self.target = target

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return self.target(model_output.float())


def _metric_targets(targets, n: int) -> list:
    """One pytorch-grad-cam target per image: target objects as given, class ids as their softmax probability."""
    items = targets if isinstance(targets, (np.ndarray, torch.Tensor)) else list(targets)
    if not isinstance(items, (np.ndarray, torch.Tensor)) and items and all(callable(t) for t in items):
        if len(items) != n:
            raise ConfigError(f"targets must hold exactly one target per image: got {len(items)} for {n} images.")
        return items
    classes = np.asarray(items)
    if classes.shape != (n,):
        raise ConfigError(f"targets must hold exactly one class per image: got shape {classes.shape} for {n} images.")
    return [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]


def _check_scores_before(scores_before, n: int) -> Optional[np.ndarray]:
    if scores_before is None:
        return None
    before = np.asarray(scores_before, dtype=np.float32).reshape(-1)
    if before.shape != (n,) or not np.isfinite(before).all():
        raise ConfigError(f"scores_before must hold one finite score per image ({n}); got shape {before.shape}.")
    return before


def _perturbation_score(scorer, x: torch.Tensor, maps: np.ndarray, targets: list, model: nn.Module,
                        before: Optional[np.ndarray] = None) -> np.ndarray:
    """A pytorch-grad-cam perturbation metric's score_after - score_before. With `before` known, the metric is
    asked for the perturbed scores only (return_diff=False), which saves its forward pass on the originals."""
    if before is None:
        return scorer(x, maps, targets, model)
    return scorer(x, maps, targets, model, return_diff=False) - before
