"""Grad-CAM of every test image for its true and its predicted class, on the target layer's own grid, computed
inside the one inference pass.

For a GAP -> Linear head the Grad-CAM of class c is ReLU(Σ_k W[c,k]/(h·w) · A_k) (helpers.model.cams
.gradcam_from_activations), so the pass can reduce each batch's activations to two small maps per image while it
has them: (N, 2, h, w) floats (8 MB for 20,000 images on a 7x7 grid) instead of a second forward pass over the
confusion-matrix cells' images (up to CELL_IMAGES_MAX of them) later. Upsampling and the library's min-max scaling
happen when a map is drawn (`maps`), exactly as the fast path does them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from helpers.model.cam_store import LayerObserver

TRUE, PRED = 0, 1


class PassCams(LayerObserver):
    """Kept by a forward hook on `layer` during the inference pass (`capture()`, then `update()` after each batch,
    the interface run_inference gives its observers)."""

    def __init__(self, layer: Optional[torch.nn.Module], weights: Optional[torch.Tensor], n_images: int,
                 kept: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None):
        super().__init__(layer)
        self.weights = None if weights is None else weights.detach().float().cpu()   # (C, K) of the final Linear
        self.n_images = int(n_images)
        self._grid: Optional[np.ndarray] = None          # (N, 2, h, w) float32, allocated at the first batch
        self._filled = np.zeros(self.n_images, dtype=bool)
        self._classes = np.full((self.n_images, 2), -1, dtype=np.int64)   # the true and predicted class kept
        if kept is not None:   # (grid, classes, filled) read back from the cache
            self._grid, self._classes, self._filled = kept

    def update(self, start: int, probs: np.ndarray, labels: np.ndarray, preds: np.ndarray) -> None:
        n = len(probs)
        acts = self._take(n)
        if acts is None or acts.shape[1] != self.weights.shape[1]:
            return
        a = acts.float().cpu()
        h, w = a.shape[2], a.shape[3]
        if self._grid is None:
            self._grid = np.zeros((self.n_images, 2, h, w), dtype=np.float32)
        classes = np.clip(np.stack([np.asarray(labels), np.asarray(preds)], axis=1), 0, len(self.weights) - 1)
        wt = self.weights[torch.as_tensor(classes, dtype=torch.long)] / (h * w)    # (B, 2, K)
        self._grid[start:start + n] = torch.einsum("bjk,bkhw->bjhw", wt, a).clamp_min(0).numpy()
        self._classes[start:start + n] = np.stack([np.asarray(labels), np.asarray(preds)], axis=1)
        self._filled[start:start + n] = True

    def kept_state(self) -> dict:
        """This pass's maps for another process (a torchrun shard's images): their rows, maps and classes."""
        rows = np.flatnonzero(self._filled)
        grid = self._grid[rows] if self._grid is not None else None
        return {"rows": rows, "grid": grid, "classes": self._classes[rows]}

    def merge_states(self, states) -> None:
        """Take in the kept_state() of the other shards' passes over disjoint images of the same test set."""
        for state in states:
            if state["grid"] is None or not len(state["rows"]):
                continue
            if self._grid is None:
                self._grid = np.zeros((self.n_images,) + state["grid"].shape[1:], dtype=np.float32)
            if self._filled[state["rows"]].any():
                raise ValueError("pass CAM states overlap: the merged passes must cover disjoint images")
            self._grid[state["rows"]] = state["grid"]
            self._classes[state["rows"]] = state["classes"]
            self._filled[state["rows"]] = True

    @property
    def complete(self) -> bool:
        """Every image of the pass has its two maps (a pass that ended early, or a model whose hook saw no
        map, has not)."""
        return self._grid is not None and bool(self._filled.all())

    def maps(self, indices, which: int, out_size: tuple[int, int]) -> np.ndarray:
        """(len(indices), H, W) CAMs of `indices` for their true (TRUE) or predicted (PRED) class, upsampled and
        min-max scaled as pytorch-grad-cam does."""
        from helpers.model.cams import scale_like_library
        idx = np.asarray(indices, dtype=np.int64)
        if self._grid is None or not self._filled[idx].all():
            raise ValueError("PassCams.maps: images without maps from the inference pass")
        return scale_like_library(self._grid[idx, which], out_size)

    def _which(self, idx: np.ndarray, cls: np.ndarray) -> np.ndarray:
        """TRUE or PRED where the pass kept image idx[i]'s map for class cls[i], else -1."""
        which = np.where(self._classes[idx, TRUE] == cls, TRUE, np.where(self._classes[idx, PRED] == cls, PRED, -1))
        return np.where(self._filled[idx], which, -1)

    def kept(self, indices, classes) -> np.ndarray:
        """Positions of the (indices[i], classes[i]) requests the pass kept (the image's true or predicted class)."""
        idx, cls = np.asarray(indices, dtype=np.int64), np.asarray(classes, dtype=np.int64)
        if self._grid is None or not len(idx):
            return np.zeros(0, np.int64)
        return np.flatnonzero(self._which(idx, cls) >= 0)

    def lookup(self, indices, classes, out_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(positions, maps): the requests kept() finds and their CAMs, as maps() gives them."""
        idx, cls = np.asarray(indices, dtype=np.int64), np.asarray(classes, dtype=np.int64)
        pos = self.kept(idx, cls)
        if not len(pos):
            return pos, np.zeros((0,) + tuple(out_size), np.float32)
        from helpers.model.cams import scale_like_library
        return pos, scale_like_library(self._grid[idx[pos], self._which(idx[pos], cls[pos])], out_size)

    # ------------------------------------------------------------------ on-disk cache (CamStore.export / load)
    def arrays(self) -> dict[str, np.ndarray]:
        if self._grid is None:
            return {}
        return {"pass_grid": self._grid, "pass_classes": self._classes, "pass_filled": self._filled}

    @classmethod
    def from_arrays(cls, arrays, n_images: int, num_classes: Optional[int]) -> "PassCams":
        """A read-only PassCams (no layer, no hook) from arrays(); raises ValueError on anything malformed."""
        grid, classes, filled = (np.asarray(arrays[k]) for k in ("pass_grid", "pass_classes", "pass_filled"))
        if grid.dtype != np.float32 or grid.ndim != 4 or grid.shape[:2] != (n_images, 2):
            raise ValueError("pass CAM grid of another shape or type than this run's images")
        if classes.shape != (n_images, 2) or not np.issubdtype(classes.dtype, np.integer):
            raise ValueError("pass CAM classes malformed")
        if filled.shape != (n_images,) or filled.dtype != bool:
            raise ValueError("pass CAM mask malformed")
        if not np.isfinite(grid).all() or (grid < 0).any():
            raise ValueError("pass CAM grid holds negative, NaN or infinite values")
        if classes.min(initial=0) < -1 or (num_classes is not None and classes.max(initial=0) >= num_classes):
            raise ValueError("pass CAM classes outside the model's classes")
        return cls(None, None, n_images, kept=(grid, classes.astype(np.int64), filled))
