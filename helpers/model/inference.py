"""One inference pass over a dataset: logits, probabilities and penultimate features."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from helpers.errors import ConfigError
from helpers.model.layers import final_linear, float32_model

if TYPE_CHECKING:
    from helpers.model.cam_store import GalleryActivations


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


def _cpu_times() -> Optional[tuple[float, float]]:
    """(idle, total) jiffies of all CPUs from /proc/stat (Linux), or None."""
    try:
        with open("/proc/stat") as fh:
            fields = [float(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0.0), sum(fields[:8])


def default_threads(sample_s: float = 0.2) -> int:
    """Torch CPU threads: the CPUs this process may use, less those other processes keep busy right now.

    OpenMP threads that outnumber the free cores wait for each other at every operation, so a thread without
    a free core slows the whole pass down rather than speeding it up. Busy CPUs are measured over `sample_s`
    from /proc/stat (this process is idle meanwhile); elsewhere every CPU counts as free."""
    import time
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    first = _cpu_times()
    if first is None or cpus <= 1:
        return max(1, cpus)
    time.sleep(sample_s)
    second = _cpu_times()
    total = second[1] - first[1] if second else 0.0
    if total <= 0:
        return cpus
    host_cpus = os.cpu_count() or cpus
    free = host_cpus * (second[0] - first[0]) / total
    return max(1, min(cpus, int(free + 0.5)))


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then the CPU."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"DEVICE {device!r} is not a device. Use 'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps'.") from None


def head_input_hook(model: torch.nn.Module, probe: torch.Tensor, sink: list,
                    dtype: torch.dtype = torch.float32):
    """Hook that appends the input of the model's final Linear (the penultimate features, flattened, on the CPU,
    as `dtype`) to `sink` at every forward; None when the model has no such head. `probe` (one input on the
    model's device) finds the head by the model's output size. Remove the returned handle when done."""
    with torch.inference_mode():
        out = model(probe)
    head = final_linear(model, int(out.shape[-1]))
    if head is None:
        return None
    return head.register_forward_hook(lambda _m, inp, _out: sink.append(inp[0].detach().flatten(1).to("cpu", dtype)))


def feature_pass(model: torch.nn.Module, images: np.ndarray, mean: Sequence[float], std: Sequence[float],
                 batch_size: int = 256, device: torch.device | str = "cpu", progress: bool = True,
                 desc: str = "Train features", dtype: torch.dtype = torch.float16) -> Optional[np.ndarray]:
    """Penultimate features (N, D) of uint8 (N, H, W, C) `images`, normalised one batch at a time so that
    memory holds only the images given, one batch of inputs and the features (`dtype`, float16 by default:
    half the memory, ample for cosine neighbours). None when the model has no final Linear. The same hook as
    run_inference; the logits are not kept."""
    from tqdm.auto import tqdm
    device = torch.device(device)
    n = len(images)
    if not n:
        return None
    first = to_tensor(images[:1], mean, std).to(device)
    model, _ = float32_model(model, [first])
    channels_last = device.type != "mps"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    parts: list = []
    hook = head_input_hook(model, first, parts, dtype)
    if hook is None:
        return None
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
                batch = to_tensor(images[start:start + batch_size], mean, std).to(device, non_blocking=True)
                if channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                model(batch)
    finally:
        hook.remove()
    return torch.cat(parts).numpy()


def run_inference(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: np.ndarray,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
    capture_features: bool = True,
    gallery: Optional["GalleryActivations"] = None,
) -> Predictions:
    """Run `model` once over `inputs` (normalised N,C,H,W) and keep logits, probabilities and the
    penultimate features (the head's input, captured by a forward hook in the same pass).

    `gallery` (a helpers.model.cam_store.GalleryActivations) also keeps, in the same pass, the target layer's
    activations of the images the class galleries will show, so their CAMs need no second pass.
    channels_last is used on CPU and CUDA (faster on CPU for ResNets); probabilities are
    computed per batch, the same values the gallery selection sees. A float16/bfloat16 model whose forward does
    not convert the float32 images itself runs as a float32 copy (layers.float32_model).
    helpers.model.sanity.check_model_behaviour is what tells a model that returns probabilities, depends on its
    batch or switches itself to train mode; the analysis calls it before this pass."""
    from tqdm.auto import tqdm

    from helpers.errors import NumericalError

    device = torch.device(device)
    if len(inputs):   # float16/bfloat16 weights that cannot take the float32 images: a float32 copy (no-op for float32)
        model, _ = float32_model(model, [inputs[:1].to(device)])
    channels_last = device.type != "mps" and inputs.dim() == 4
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    n = len(inputs)
    logits_parts, feature_parts = [], []
    hook = head_input_hook(model, inputs[:1].to(device), feature_parts) if capture_features and n else None
    labels = np.asarray(labels, dtype=np.int64)
    prob_parts = []
    capture = gallery.capture() if gallery is not None else contextlib.nullcontext()
    try:
        with torch.inference_mode(), capture:
            for start in tqdm(range(0, n, batch_size), desc="Inference", unit="batch", disable=not progress):
                batch = inputs[start:start + batch_size].to(device, non_blocking=True)
                if channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                out = model(batch).float().cpu()
                logits_parts.append(out)
                prob_parts.append(torch.softmax(out, dim=1).numpy())
                if gallery is not None:
                    gallery.update(start, prob_parts[-1], labels[start:start + len(out)], out.argmax(dim=1).numpy())
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
    probs = np.concatenate(prob_parts) if prob_parts else np.zeros((0, 0), np.float32)
    features = torch.cat(feature_parts).numpy() if feature_parts and len(feature_parts) == len(logits_parts) else None
    return Predictions(
        logits=logits.astype(np.float32),
        probs=probs.astype(np.float32),
        preds=logits.argmax(axis=1).astype(np.int64),
        labels=labels,
        features=features,
    )
