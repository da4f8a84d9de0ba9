"""The inference pass's companions: its cache key, the predictions read from and written to the run cache,
and the CAM store that serves every later CAM."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from helpers.config import Params
from helpers.data.datasets import Dataset
from helpers.files.cache import RunCache, cache_key
from helpers.files.outputs import Outputs
from helpers.model.cam_store import CamStore
from helpers.model.cams import CamEngine
from helpers.model.inference import Predictions
from helpers.model.load import LoadedModel

MAX_CAM_BATCH = 128   # CAM batches after inference are small: larger ones only hold more memory


def cache_key_for(params: Params, loaded: LoadedModel, data: Dataset, inputs: torch.Tensor) -> str:
    """Hash of what the predictions depend on: the checkpoint bytes, the architecture and its arguments, the
    data (a hash of images and labels) and the preprocessing. CAM- and deep-dive-specific parameters
    (CAM_METHOD, TARGET_LAYER, SEED, EMBEDDING, group, ...) key the entries inside the derived cache."""
    p = params
    return cache_key({
        "weights": loaded.weights_sha256, "arch": loaded.arch, "model_kwargs": p.MODEL_KWARGS,
        "data": data.fingerprint, "n": len(data.labels), "shape": list(inputs.shape[1:]),
        "mean": [float(v) for v in data.mean], "std": [float(v) for v in data.std], "dataset": p.DATASET,
        "limit": p.LIMIT, "convert": p.CONVERT_CHANNELS,
    })


def read_predictions(cache: RunCache, data: Dataset) -> Optional[Predictions]:
    """The cached predictions of this key, or None when missing or not fitting the data."""
    z = cache.read(".npz", "predictions")
    if z is None:
        return None
    try:
        preds = Predictions(logits=z["logits"], probs=z["probs"], preds=z["preds"], labels=z["labels"],
                            features=z.get("features"))
        n = len(data.labels)
        ok = (preds.logits.ndim == 2 and preds.logits.shape[0] == n and preds.probs.shape == preds.logits.shape
              and preds.preds.shape == (n,) and np.array_equal(preds.labels, data.labels)
              and (preds.features is None or len(preds.features) == n))
    except Exception:
        ok = False
    if not ok:
        cache.reject(f"{cache.key}.npz: arrays do not fit the data")
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

    return CamStore(engine, inputs, method=params.CAM_METHOD, layer=params.TARGET_LAYER)


def restore_derived(cache: RunCache, store: CamStore, outputs: Outputs) -> None:
    """An earlier identical run's CAMs, memoised results and drawn-gallery digests, when they read back."""
    outputs.drawn_before = cache.load_derived(store.load)


def save_derived(cache: RunCache, store: CamStore, outputs: Outputs) -> None:
    cache.save_derived(store.export(), outputs.drawn_record())
