"""The inference pass's companions: its cache key, the predictions read from and written to the run cache,
and the CAM store that serves every later CAM."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from helpers.config import Params
from helpers.data.datasets import Dataset
from helpers.files.cache import RunCache, cache_key
from helpers.files.digest import file_digest
from helpers.files.outputs import Outputs
from helpers.model.cam_store import CamStore
from helpers.model.cams import CamEngine
from helpers.model.inference import Predictions
from helpers.model.load import LoadedModel
from helpers.model.pass_cams import PassCams
from helpers.model.pass_inputs import PassInputs

MAX_CAM_BATCH = 128   # CAM batches after inference are small: larger ones only hold more memory


def arch_source_digest(arch: str) -> Optional[str]:
    """sha256 of the Python file an ARCH 'path/to/model.py:ClassName' names (resolved as load_model resolves it:
    relative to the working directory), or None for any other ARCH: editing model.py changes the cache key."""
    arch = str(arch or "").strip()
    if ":" not in arch:
        return None
    file_part = arch.rsplit(":", 1)[0]
    if not file_part.endswith(".py"):
        return None
    try:
        return file_digest(Path(file_part).expanduser().resolve())
    except OSError:   # the model was built from it a moment ago; unreadable now: never a cache hit
        return "unreadable"


def cache_key_for(params: Params, loaded: LoadedModel, data: Dataset, inputs: torch.Tensor) -> str:
    """Hash of what the predictions depend on: the checkpoint bytes, the architecture, its arguments and (for
    ARCH='model.py:ClassName') the bytes of that file, the data (a hash of images and labels), the preprocessing
    and BATCH_SIZE (a model may depend on its batch: batch statistics, padding). CAM- and deep-dive-specific
    parameters (CAM_METHOD, TARGET_LAYER, SEED, EMBEDDING, group, ...) key the entries inside the derived cache."""
    p = params
    return cache_key({
        "weights": loaded.weights_sha256, "arch": loaded.arch, "model_kwargs": p.MODEL_KWARGS,
        "arch_source": arch_source_digest(loaded.arch), "batch_size": p.BATCH_SIZE,
        "module": type(loaded.module).__name__,   # a wrapper (softmax outputs taken as log-probabilities) changes them
        "data": data.fingerprint, "n": len(data.labels), "shape": list(inputs.shape[1:]),
        "mean": [float(v) for v in data.mean], "std": [float(v) for v in data.std], "dataset": p.DATASET,
        "limit": p.LIMIT, "convert": p.CONVERT_CHANNELS,
    })


SOFTMAX_ATOL = 1e-5   # float32 softmax per batch (torch) vs float64 recomputed here


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _floats(a: np.ndarray, name: str, shape: tuple) -> Optional[str]:
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        return f"{name} is {getattr(a, 'dtype', type(a).__name__)}, not float32"
    if a.shape != shape:
        return f"{name} has shape {a.shape}, not {shape}"
    if not np.isfinite(a).all():
        return f"{name} holds NaN or infinite values"
    return None


def prediction_problem(preds: Predictions, data: Dataset) -> Optional[str]:
    """Why cached predictions cannot be what one inference pass over `data` produced, or None: every array of
    the right shape, dtype and finite; labels equal to the data's; preds the argmax of the logits and probs
    their softmax (a cache edited so that preds := labels would otherwise report any accuracy it likes)."""
    n, c = len(data.labels), data.num_classes
    why = _floats(preds.logits, "logits", (n, c)) or _floats(preds.probs, "probs", (n, c))
    if why:
        return why
    for name, a in (("preds", preds.preds), ("labels", preds.labels)):
        if not isinstance(a, np.ndarray) or a.dtype != np.int64 or a.shape != (n,):
            return f"{name} is not an int64 array of shape ({n},)"
    if not np.array_equal(preds.labels, data.labels):
        return "labels differ from the data's"
    if n and not np.array_equal(preds.preds, preds.logits.argmax(axis=1)):
        wrong = int((preds.preds != preds.logits.argmax(axis=1)).sum())
        return f"preds are not the argmax of the logits for {wrong} of {n} images"
    if n and not np.allclose(preds.probs, softmax(preds.logits), rtol=0, atol=SOFTMAX_ATOL):
        return "probs are not the softmax of the logits"
    f = preds.features
    if f is not None and (not isinstance(f, np.ndarray) or f.dtype != np.float32 or f.ndim != 2 or len(f) != n
                          or not np.isfinite(f).all()):
        return "features are not a finite float32 array with one row per image"
    return None


def read_predictions(cache: RunCache, data: Dataset) -> Optional[Predictions]:
    """The cached predictions of this key, or None (recompute) when missing, damaged or not what an inference pass
    over this data gives (prediction_problem); a rejected file is recorded in the cache stats."""
    z = cache.read(".npz", "predictions")
    if z is None:
        return None
    try:
        preds = Predictions(logits=z["logits"], probs=z["probs"], preds=z["preds"], labels=z["labels"],
                            features=z.get("features"))
        why = prediction_problem(preds, data)
    except Exception as exc:   # a missing member, an array that does not compare: not ours
        why = f"{type(exc).__name__}: {exc}"
    if why:
        cache.reject(f"{cache.key}.npz: {why}")
        return None
    return preds


def write_predictions(cache: RunCache, preds: Predictions) -> None:
    arrays = dict(logits=preds.logits, probs=preds.probs, preds=preds.preds, labels=preds.labels)
    if preds.features is not None:
        arrays["features"] = preds.features
    cache.write(".npz", "predictions", arrays)


def cam_store(params: Params, loaded: LoadedModel, inputs: torch.Tensor, device: torch.device) -> CamStore:
    shape = tuple(inputs.shape[1:])

    def engine(method: str, layer: Optional[str]) -> CamEngine:
        return CamEngine(loaded.module, method=method, target_layer=layer, input_shape=shape,
                         batch_size=min(params.BATCH_SIZE, MAX_CAM_BATCH), device=str(device))

    return CamStore(engine, inputs, method=params.CAM_METHOD, layer=params.TARGET_LAYER,
                    num_classes=loaded.num_classes)


def pass_cams(store: CamStore, n_images: int) -> Optional[PassCams]:
    """The observer that keeps every image's true/pred Grad-CAM during the pass itself (fast path only)."""
    engine = store.engine()
    return PassCams(engine.layer, engine.head_weight, n_images) if engine.head_weight is not None else None


def pass_inputs(store: CamStore, n_images: int, seed: int) -> Optional[PassInputs]:
    """The observer that keeps, within a budget, what the exact CAM paths start from for the errors and then the
    other images: the torch.fx tail's inputs, or on the fast path the target layer's map (the concepts step and
    the CAMs of classes other than the true and predicted one read it). None when neither path applies."""
    engine = store.engine()
    keep = engine.inference_keep
    if keep is None:
        return None
    return PassInputs(engine.layer, keep, n_images, seed=seed)


def restore_derived(cache: RunCache, store: CamStore, outputs: Outputs) -> None:
    """An earlier identical run's CAMs, memoised results and drawn-gallery digests, when they read back."""
    outputs.drawn_before = cache.load_derived(store.load)


def save_derived(cache: RunCache, store: CamStore, outputs: Outputs) -> None:
    cache.save_derived(store.export(), outputs.drawn_record())
