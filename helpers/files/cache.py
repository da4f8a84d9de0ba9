"""The run cache next to the outputs: OUTPUT_DIR/.cache/<key>.npz holds the predictions, <key>-derived.npz the
CAMs, the memoised deep-dive results and the digests of the drawn galleries.

Both are written atomically (temporary file, fsync, rename) and fully read and checked before use: a truncated
or foreign file is ignored and recomputed, never trusted. No pickle: memo values are JSON with their arrays
stored beside it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from helpers.files import atomic

CACHE_VERSION = 3   # bump when a cached computation changes: entries of another version are recomputed
CACHE_KEEP = 4      # cache entries (distinct model/data/params) kept in OUTPUT_DIR/.cache


def jsonable_key(value: Any) -> Any:
    """A JSON form of a memo key part; arrays and tensors by content hash, dataclasses field by field."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # field by field: str() of a dataclass would print its arrays, summarised with "..." when large
        return {"__dataclass__": type(value).__qualname__,
                **{f.name: jsonable_key(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if hasattr(value, "detach") and hasattr(value, "numpy"):   # a torch tensor (files/ does not import torch)
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        return {"sha1": hashlib.sha1(arr.view(np.uint8).ravel()).hexdigest(), "shape": list(arr.shape),
                "dtype": str(arr.dtype)}
    if isinstance(value, dict):
        return {str(k): jsonable_key(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple, set)):
        items = sorted(value) if isinstance(value, set) else value
        return [jsonable_key(v) for v in items]
    if isinstance(value, np.generic):
        return value.item()
    return value


def digest(key: Any) -> str:
    return hashlib.sha1(json.dumps(jsonable_key(key), sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_key(identity: dict) -> str:
    """The entry name for everything the predictions depend on (checkpoint hash, architecture, data hash, ...)."""
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **identity}, sort_keys=True, default=str)
                          .encode()).hexdigest()[:20]


def _encode(value: Any, arrays: dict) -> Any:
    """JSON-able form of a memo value; arrays go to `arrays` under memo/<n>."""
    if isinstance(value, np.ndarray):
        name = f"memo/{sum(k.startswith('memo/') for k in arrays)}"
        arrays[name] = value
        return {"__array__": name}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, arrays) for v in value]}
    if isinstance(value, list):
        return [_encode(v, arrays) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value) or "__array__" in value or "__tuple__" in value:
            raise TypeError("memo dicts need plain string keys")
        return {k: _encode(v, arrays) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot cache a {type(value).__name__}")


def _decode(obj: Any, arrays: dict) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return np.asarray(arrays[obj["__array__"]])
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, arrays) for v in obj["__tuple__"])
        return {k: _decode(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, arrays) for v in obj]
    return obj


class RunCache:
    """The npz cache of one (model, data, preprocessing) key, and the memo of results computed from it."""

    def __init__(self, output_dir: str | Path, key: str, force: bool = False):
        self.folder = Path(output_dir) / ".cache"
        self.key = key
        self.force = force       # FORCE_RECOMPUTE: stored results are ignored (and overwritten)
        self.hit = False         # the predictions came from here
        self.memo: dict[str, Any] = {}
        self.stats = {"memo_hits": 0, "memo_misses": 0, "memo_missed": [], "cams_loaded": 0, "outputs_kept": 0,
                      "rejected": []}

    def file(self, suffix: str) -> Path:
        return self.folder / f"{self.key}{suffix}"

    def _meta(self, kind: str) -> np.ndarray:
        return np.array(json.dumps({"v": CACHE_VERSION, "key": self.key, "kind": kind}))

    def read(self, suffix: str, kind: str) -> Optional[dict]:
        """Every array of a cache file, or None when it is missing, truncated, corrupt or not ours."""
        path = self.file(suffix)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}   # reads (and CRC-checks) every member now
            meta = json.loads(str(arrays.pop("meta")))
            if meta != json.loads(str(self._meta(kind))):
                raise ValueError(f"cache made for {meta}")
            return arrays
        except Exception as exc:  # truncated zip, bad CRC, missing member, foreign file: recompute
            self.reject(f"{path.name}: {type(exc).__name__}")
            return None

    def reject(self, why: str) -> None:
        self.stats["rejected"].append(why)

    def write(self, suffix: str, kind: str, arrays: dict) -> None:
        try:
            with atomic.atomic_path(self.file(suffix), fsync=True) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, meta=self._meta(kind), **arrays)
            self._prune()
        except OSError:
            pass  # the cache is an optimisation; the analysis itself already has its results

    def _prune(self) -> None:
        """Keep the CACHE_KEEP most recently written entries (one per model/data/params)."""
        keys: dict[str, float] = {}
        for f in self.folder.glob("*.npz"):
            if f.name.startswith("."):   # another run's file still being written
                continue
            key = f.name.split("-", 1)[0].split(".", 1)[0]
            keys[key] = max(keys.get(key, 0.0), f.stat().st_mtime)
        for key in sorted(keys, key=keys.get, reverse=True)[CACHE_KEEP:]:
            for f in self.folder.glob(f"{key}[.-]*npz"):
                f.unlink(missing_ok=True)

    # ------------------------------------------------------------------ derived results
    def load_derived(self, load_cams: Callable[[dict], int]) -> dict:
        """Restore an earlier run's memo, hand its CAM arrays to `load_cams` (which returns how many it took) and
        return its drawn-gallery record; nothing at all is restored when any part does not read back."""
        z = self.read("-derived.npz", "derived")
        if z is None:
            return {}
        try:
            memo = {key: _decode(value, z) for key, value in json.loads(str(z["memo"])).items()}
            drawn = json.loads(str(z["outputs"])) if "outputs" in z else {}
            n = load_cams(z) if "cam_index" in z else 0
        except Exception as exc:
            self.reject(f"{self.key}-derived.npz: {type(exc).__name__}")
            return {}
        self.memo.update(memo)
        self.stats["cams_loaded"] = n
        return drawn

    def save_derived(self, cam_arrays: dict, drawn: dict) -> None:
        arrays = dict(cam_arrays)
        memo = {}
        for key, value in self.memo.items():
            try:
                memo[key] = _encode(value, arrays)
            except TypeError:   # a value the cache cannot hold without pickle: recomputed next time
                continue
        arrays["memo"] = np.array(json.dumps(memo))
        arrays["outputs"] = np.array(json.dumps(drawn))
        self.write("-derived.npz", "derived", arrays)

    def cached(self, name: str, compute: Callable[[], Any], *key: Any) -> Any:
        """`compute()`, or its result from an identical earlier run: same model, data and preprocessing (the
        cache key) and the same `key` parts (every other input of `compute`: indices, classes, method, seed,
        ...; arrays are hashed by content). Values: arrays, numbers, strings, None, and lists, tuples and
        str-keyed dicts of those."""
        mkey = f"{name}:{digest(key)}"
        if mkey in self.memo:
            self.stats["memo_hits"] += 1
            return self.memo[mkey]
        value = compute()
        self.stats["memo_misses"] += 1
        self.stats["memo_missed"].append(name)
        self.memo[mkey] = value
        return value
