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


class StreamedInputs:
    """Normalised float32 (N, C, H, W) inputs of images decoded when read (helpers.data.images.FileImages).

    Indexing (an int, a slice, integer indices as a list, array or tensor) decodes and normalises just those
    images, as to_tensor would; `batches()` streams the whole set through a DataLoader with worker processes
    for the inference pass. Nothing of the whole set is held."""

    ndim = 4
    dtype = torch.float32

    def __init__(self, images, mean: Sequence[float], std: Sequence[float]):
        self.images, self.mean, self.std = images, tuple(mean), tuple(std)

    @property
    def shape(self) -> torch.Size:
        n, h, w, c = self.images.shape
        return torch.Size((n, c, h, w))

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        if isinstance(key, (int, np.integer)):
            return to_tensor(self.images[key][None].copy(), self.mean, self.std)[0]   # the memo's array is read-only
        return to_tensor(self.images[key], self.mean, self.std)

    def subset(self, start: int, stop: int) -> "StreamedInputs":
        """Images start..stop, still decoded when read (a distributed rank's shard)."""
        return StreamedInputs(self.images.subset(start, stop), self.mean, self.std)

    def batches(self, batch_size: int, workers: int, pin_memory: bool = False):
        """(start, uint8 (B, H, W, C) tensor) for consecutive batches, decoded by `workers` processes (0: here)."""
        from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
        loader = DataLoader(_Decoded(self.images), batch_size=None, num_workers=workers, pin_memory=pin_memory,
                            sampler=BatchSampler(SequentialSampler(range(len(self))), batch_size, drop_last=False),
                            prefetch_factor=2 if workers else None)
        start = 0
        for batch in loader:
            yield start, batch
            start += len(batch)

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """A uint8 (B, H, W, C) batch from batches() -> normalised float32 (B, C, H, W), on batch's device."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
        return (batch.permute(0, 3, 1, 2).float().div_(255.0) - mean) / std


class _Decoded(torch.utils.data.Dataset):
    """Map-style dataset over a list of indices: one uint8 batch per item (one pickle per batch, not per image)."""

    def __init__(self, images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices) -> torch.Tensor:
        return torch.from_numpy(self.images.stack(indices))


def autocast_dtype(device: torch.device, setting: Optional[bool]) -> Optional[torch.dtype]:
    """MIXED_PRECISION: float16 autocast for the inference pass on CUDA when None (default) or True, else None."""
    return torch.float16 if torch.device(device).type == "cuda" and setting in (None, True) else None


def decoded_when_read(images) -> bool:
    """Images that decode on access (helpers.data.images.FileImages, duck-typed: the model layer does not import
    the data layer) rather than an in-memory array."""
    return not isinstance(images, np.ndarray) and callable(getattr(images, "stack", None))


def model_inputs(images, mean: Sequence[float], std: Sequence[float]):
    """What the analysis feeds the model: a normalised tensor for in-memory images (CIFAR, MNIST: small), a
    StreamedInputs for images decoded from files (image folders: any size)."""
    return StreamedInputs(images, mean, std) if decoded_when_read(images) else to_tensor(images, mean, std)


def loader_workers(n_images: int, batch_size: int) -> int:
    """Decoding processes for a streamed pass: none for a single batch (starting one costs more than it saves),
    else one per two CPUs (at least one, at most four): decoding is a small share of a forward pass."""
    if n_images <= batch_size:
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus // 2))


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


def feature_pass(model: torch.nn.Module, images, mean: Sequence[float], std: Sequence[float],
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
    # Image folders stream through the DataLoader; arrays are normalised one batch at a time (never as a whole).
    batches = (_device_batches(StreamedInputs(images, mean, std), batch_size, device, None) if decoded_when_read(images)
               else ((s, to_tensor(images[s:s + batch_size], mean, std).to(device, non_blocking=True))
                     for s in range(0, n, batch_size)))
    try:
        with torch.inference_mode(), tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
            for _, batch in batches:
                if channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                model(batch)
                bar.update(len(batch))
    finally:
        hook.remove()
    return torch.cat(parts).numpy()


def _device_batches(inputs, batch_size: int, device: torch.device, workers: Optional[int]):
    """(start, normalised batch on `device`) over the whole set: slices of a tensor, or a StreamedInputs'
    DataLoader (uint8 to the device, normalised there: a quarter of the bytes to copy)."""
    pin = device.type == "cuda"
    if isinstance(inputs, torch.Tensor):
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start:start + batch_size]
            yield start, (batch.pin_memory() if pin else batch).to(device, non_blocking=True)
        return
    workers = loader_workers(len(inputs), batch_size) if workers is None else workers
    for start, batch in inputs.batches(batch_size, workers, pin_memory=pin):
        yield start, inputs.normalise(batch.to(device, non_blocking=True))


def run_inference(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: np.ndarray,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
    capture_features: bool = True,
    gallery: Optional["GalleryActivations"] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    workers: Optional[int] = None,
    observers: Sequence = (),
) -> Predictions:
    """Run `model` once over `inputs` (normalised N,C,H,W: a tensor, or StreamedInputs decoded by `workers`
    DataLoader processes, default loader_workers()) and keep logits, probabilities and the penultimate features
    (the head's input, captured by a forward hook in the same pass).

    `autocast_dtype` (torch.float16 on CUDA: mixed precision) runs the forward under torch.autocast; logits,
    features and gallery activations are kept as float32. On CUDA the batches come from pinned memory with
    non-blocking copies, so the next batch is copied while this one computes.

    `gallery` (a helpers.model.cam_store.GalleryActivations) also keeps, in the same pass, the target layer's
    activations of the images the class galleries will show, so their CAMs need no second pass; `observers`
    (e.g. helpers.model.pass_cams.PassCams) are driven the same way: capture() around the pass, update() per batch.
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
    watchers = [w for w in [gallery, *observers] if w is not None]
    capture = contextlib.ExitStack()
    for w in watchers:
        capture.enter_context(w.capture())
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    try:
        with torch.inference_mode(), capture, tqdm(total=n, desc="Inference", unit="img", disable=not progress) as bar:
            for start, batch in _device_batches(inputs, batch_size, device, workers):
                if channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                with amp:
                    out = model(batch)
                out = out.float().cpu()
                logits_parts.append(out)
                prob_parts.append(torch.softmax(out, dim=1).numpy())
                if watchers:
                    batch_preds = out.argmax(dim=1).numpy()
                    for w in watchers:
                        w.update(start, prob_parts[-1], labels[start:start + len(out)], batch_preds)
                bar.update(len(out))
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
    features = torch.cat(feature_parts).float().numpy() if feature_parts and len(feature_parts) == len(logits_parts) else None
    return Predictions(
        logits=logits.astype(np.float32),
        probs=probs.astype(np.float32),
        preds=logits.argmax(axis=1).astype(np.int64),
        labels=labels,
        features=features,
    )
