"""One inference pass over a dataset: logits, probabilities and penultimate features."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch


@dataclass
class Predictions:
    logits: np.ndarray                   # (N, C) float32
    probs: np.ndarray                    # (N, C) float32, softmax of logits
    preds: np.ndarray                    # (N,) int64
    labels: np.ndarray                   # (N,) int64
    features: Optional[np.ndarray] = None  # (N, D) float32: the input of the final Linear, when there is one

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(axis=1)

    @property
    def correct(self) -> np.ndarray:
        return self.preds == self.labels

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.labels) else float("nan")


def to_tensor(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, H, W, C) -> normalised float32 (N, C, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then the CPU."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def final_linear(model: torch.nn.Module, num_classes: int) -> Optional[torch.nn.Linear]:
    """The classifier head: the last Linear layer whose output size is the number of classes."""
    head = None
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.out_features == num_classes:
            head = module
    return head


def run_inference(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: np.ndarray,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
    capture_features: bool = True,
) -> Predictions:
    """Run `model` once over `inputs` (normalised N,C,H,W) and keep logits, probabilities and the
    penultimate features (the head's input, captured by a forward hook in the same pass)."""
    from tqdm.auto import tqdm

    from .errors import NumericalError

    device = torch.device(device)
    channels_last = device.type != "mps" and inputs.dim() == 4
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    n = len(inputs)
    logits_parts, feature_parts = [], []
    head = None
    hook = None
    if capture_features:
        with torch.inference_mode():
            probe = model(inputs[:1].to(device)) if n else None
        head = final_linear(model, int(probe.shape[-1])) if probe is not None else None
        if head is not None:
            hook = head.register_forward_hook(
                lambda _m, inp, _out: feature_parts.append(inp[0].detach().float().flatten(1).cpu())
            )
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, n, batch_size), desc="Inference", unit="batch", disable=not progress):
                batch = inputs[start:start + batch_size].to(device, non_blocking=True)
                if channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                logits_parts.append(model(batch).float().cpu())
    finally:
        if hook is not None:
            hook.remove()
    logits = torch.cat(logits_parts).numpy() if logits_parts else np.zeros((0, 0), np.float32)
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        raise NumericalError(
            f"The model produced NaN or infinite logits for {int(bad.sum())} of {n} images "
            f"(first: image {int(np.flatnonzero(bad)[0])}). Stopping before writing misleading figures. "
            "Check the checkpoint, the normalisation (MEAN/STD) and the input channels."
        )
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    features = torch.cat(feature_parts).numpy() if feature_parts and len(feature_parts) == len(logits_parts) else None
    return Predictions(
        logits=logits.astype(np.float32),
        probs=probs.astype(np.float32),
        preds=logits.argmax(axis=1).astype(np.int64),
        labels=np.asarray(labels, dtype=np.int64),
        features=features,
    )
