"""CAMs computed on demand, in batches, and cached per (image, class, method, layer).

The galleries, the pair galleries and the widget all ask the same store, so a CAM is computed once.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch


class CamStore:
    def __init__(self, engine_factory: Callable[[str, Optional[str]], "object"], inputs: torch.Tensor,
                 method: str = "gradcam", layer: Optional[str] = None):
        """`engine_factory(method, layer)` builds a helpers.cams.CamEngine; engines are reused."""
        self._factory = engine_factory
        self._engines: dict[tuple[str, Optional[str]], object] = {}
        self.inputs = inputs
        self.method = method
        self.layer = layer
        self._cams: dict[tuple[int, int, str, str], np.ndarray] = {}
        self.n_computed = 0   # CAMs actually computed (not served from the cache)

    def engine(self, method: Optional[str] = None, layer: Optional[str] = None):
        key = (method or self.method, layer if layer is not None else self.layer)
        if key not in self._engines:
            self._engines[key] = self._factory(*key)
        return self._engines[key]

    def _key(self, idx: int, cls: int, method: str, layer_name: str):
        return (int(idx), int(cls), method, layer_name)

    def get(self, indices: Sequence[int], classes: Sequence[int], method: Optional[str] = None,
            layer: Optional[str] = None) -> np.ndarray:
        """CAMs (len(indices), H, W) for image indices[i] explaining class classes[i]."""
        indices = [int(i) for i in indices]
        classes = [int(c) for c in classes]
        if len(indices) != len(classes):
            raise ValueError("indices and classes must have the same length")
        engine = self.engine(method, layer)
        method = method or self.method
        layer_name = engine.layer_name
        missing = []
        for i, c in zip(indices, classes):
            key = self._key(i, c, method, layer_name)
            if key not in self._cams and key not in missing:
                missing.append(key)
        if missing:
            idx = torch.as_tensor([k[0] for k in missing])
            cams = engine.compute(self.inputs[idx], np.array([k[1] for k in missing]))
            for key, cam in zip(missing, cams):
                self._cams[key] = cam
            self.n_computed += len(missing)
        if not indices:
            return np.zeros((0,) + tuple(self.inputs.shape[-2:]), np.float32)
        return np.stack([self._cams[self._key(i, c, method, layer_name)] for i, c in zip(indices, classes)])

    def prefetch(self, pairs: Iterable[tuple[int, int]], **kwargs) -> None:
        pairs = list(pairs)
        if pairs:
            self.get([p[0] for p in pairs], [p[1] for p in pairs], **kwargs)

    def export(self) -> dict:
        """Picklable-free snapshot for the on-disk cache: key strings -> arrays."""
        return {f"{i}|{c}|{m}|{l}": v for (i, c, m, l), v in self._cams.items()}

    def load(self, snapshot: dict) -> None:
        for key, value in snapshot.items():
            i, c, m, l = key.split("|", 3)
            self._cams[(int(i), int(c), m, l)] = np.asarray(value)
