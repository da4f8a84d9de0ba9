"""Images decoded from their files when read, so that memory does not grow with the test set.

`FileImages` stands in for the uint8 (N, H, W, C) array of an image folder: the analysis reads a few dozen images
at a time (galleries, thumbnails, the deep dive) and the inference pass streams them through a DataLoader
(helpers.model.inference.StreamedInputs), so 20,000 images at 224 px (3 GB as one array) never sit in memory.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Sequence

import numpy as np

from helpers.errors import DataError

RECENT_IMAGES = 256   # decoded images kept for repeated reads (a gallery asks for the same images several times)


def decode_image(path: str, hw: tuple[int, int], channels: int = 3) -> np.ndarray:
    """uint8 (h, w, channels) of one file: RGB (or PIL's luma for one channel), bilinear-resized to hw when
    its size differs. Every failure is a DataError naming the file."""
    from PIL import Image

    from helpers.data.readers import bomb_error, open_image, to_rgb
    h, w = hw
    try:
        with open_image(path) as im:
            im = to_rgb(im)
            if channels == 1:
                im = im.convert("L")
            if im.size != (w, h):
                im = im.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise bomb_error(path, exc) from None
    except OSError as exc:   # truncated image data shows up only when decoding
        raise DataError(f"{path} cannot be decoded ({exc}). Delete or replace it.") from exc
    return arr[..., None] if arr.ndim == 2 else arr


class FileImages:
    """uint8 (N, H, W, C) images read from `paths` on access, each resized to (H, W).

    Behaves like the array for what the analysis does with it: len(), .shape, .dtype, .ndim, indexing by an
    int, a slice, integer indices or a boolean mask (a stacked array), and iteration. np.asarray() decodes
    every image: only for small sets."""

    ndim = 4
    dtype = np.dtype(np.uint8)

    def __init__(self, paths: Sequence[str], hw: tuple[int, int], channels: int = 3):
        self.paths = [str(p) for p in paths]
        self.hw = (int(hw[0]), int(hw[1]))
        self.channels = int(channels)
        self._recent: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths),) + self.hw + (self.channels,)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, start: int, stop: int) -> "FileImages":
        return FileImages(self.paths[start:stop], self.hw, self.channels)

    def with_channels(self, channels: int) -> "FileImages":
        return FileImages(self.paths, self.hw, channels)

    def image(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += len(self.paths)
        if not 0 <= i < len(self.paths):
            raise IndexError(f"image index {i} is out of range for {len(self.paths)} images")
        arr = self._recent.get(i)
        if arr is None:
            arr = decode_image(self.paths[i], self.hw, self.channels)
            arr.setflags(write=False)   # shared with later readers
            self._recent[i] = arr
            if len(self._recent) > RECENT_IMAGES:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(i)
        return arr

    def stack(self, indices) -> np.ndarray:
        """uint8 (len(indices), H, W, C), decoded without touching the recent-images memo (the streamed pass)."""
        out = np.empty((len(indices),) + self.shape[1:], dtype=np.uint8)
        for k, i in enumerate(indices):
            cached = self._recent.get(int(i))
            out[k] = cached if cached is not None else decode_image(self.paths[int(i)], self.hw, self.channels)
        return out

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.image(key)
        if isinstance(key, slice):
            return self.stack(range(*key.indices(len(self.paths))))
        if isinstance(key, tuple):
            if not key:
                return np.asarray(self)
            return self[key[0]][(slice(None),) + key[1:]] if not isinstance(key[0], (int, np.integer)) \
                else self.image(key[0])[key[1:]]
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (len(self.paths),):
                raise IndexError(f"boolean index of shape {idx.shape} for {len(self.paths)} images")
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or (len(idx) and not np.issubdtype(idx.dtype, np.integer)):
            raise IndexError(f"images are indexed by an int, a slice, integer indices or a mask, not {key!r}")
        out = np.empty((len(idx),) + self.shape[1:], dtype=np.uint8)
        for k, i in enumerate(idx):
            out[k] = self.image(i)
        return out

    def __iter__(self):
        for i in range(len(self.paths)):
            yield self.image(i)

    def __array__(self, dtype=None, copy=None):
        arr = self.stack(range(len(self.paths)))
        return arr.astype(dtype) if dtype is not None else arr

    def __getstate__(self) -> dict:   # DataLoader workers get the paths, not the memo
        return {"paths": self.paths, "hw": self.hw, "channels": self.channels}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["paths"], state["hw"], state["channels"])

    def fingerprint(self, labels: np.ndarray) -> str:
        """Short hash of the labels, the size read at, and every file's path, size and modification time: a
        changed file changes it without decoding every image."""
        h = hashlib.sha1(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
        h.update(f"{self.hw} {self.channels}".encode())
        for p in self.paths:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]
