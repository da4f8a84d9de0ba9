"""CAMs computed on demand, in batches, and cached per (image, class, method, layer).

The galleries, the pair galleries and the widget all ask the same store, so a CAM is computed once.
For the fast exact Grad-CAM path, `GalleryActivations` keeps the target layer's activations of the
images the class galleries will show, captured during the one inference pass, so their CAMs need no
second forward pass; for the torch.fx tail path (helpers.model.tail) it keeps the values the tail needs
(a tuple of tensors per image). Any other image falls back to a batched forward pass through the engine.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from helpers.model.cam_path import CamPath
from helpers.model.tail import head_values, layer_arrays


def _rank_in_groups(sorted_groups: np.ndarray) -> np.ndarray:
    """Position of each element inside its run of equal values (input sorted by group)."""
    return np.arange(len(sorted_groups)) - np.searchsorted(sorted_groups, sorted_groups, side="left")


def worst_first(idx: np.ndarray, labels: np.ndarray, preds: np.ndarray, p_pred: np.ndarray,
                p_label: np.ndarray) -> np.ndarray:
    """The gallery's "worst" order over candidate images (a permutation): by true class; inside a class the
    errors first, most confident in the wrong class first, then the correct ones, least sure first; ties by
    image index. The one definition of the rule: metrics.rank_worst and the streamed selection both use it."""
    wrong = preds != labels
    return np.lexsort((idx, np.where(wrong, -p_pred, p_label), (~wrong).astype(np.int8), labels))


def best_first(idx: np.ndarray, labels: np.ndarray, p_label: np.ndarray) -> np.ndarray:
    """The "best" order over correctly classified candidates: by class, most confident first, ties by index."""
    return np.lexsort((idx, -p_label, labels))


def gallery_selection(idx: np.ndarray, labels: np.ndarray, preds: np.ndarray, p_pred: np.ndarray,
                      p_label: np.ndarray, n_worst: int, n_best: int) -> np.ndarray:
    """Boolean mask over candidate images: per true class, the first `n_worst` in worst_first order and the
    first `n_best + n_worst` correct ones in best_first order (what metrics.gallery_examples picks from).

    The order is total and restricted subsets keep it, so selecting from (kept so far ∪ new batch)
    after every batch ends with exactly the selection over the whole set."""
    idx, labels, preds = (np.asarray(a, dtype=np.int64) for a in (idx, labels, preds))
    p_pred, p_label = np.asarray(p_pred, dtype=np.float32), np.asarray(p_label, dtype=np.float32)
    keep = np.zeros(len(idx), dtype=bool)
    if not len(idx):
        return keep
    if n_worst > 0:
        order = worst_first(idx, labels, preds, p_pred, p_label)
        keep[order[_rank_in_groups(labels[order]) < n_worst]] = True
    n_top = n_best + n_worst
    right = np.flatnonzero(preds == labels)
    if n_top > 0 and len(right):
        order = right[best_first(idx[right], labels[right], p_label[right])]
        keep[order[_rank_in_groups(labels[order]) < n_top]] = True
    return keep


KeptBatch = Union[torch.Tensor, tuple[torch.Tensor, ...]]


def output_map(_inputs: tuple, output) -> Optional[torch.Tensor]:
    """The default `keep` rule: the target layer's output when it is a 4-D CNN map (the fast Grad-CAM path)."""
    return output if isinstance(output, torch.Tensor) and output.dim() == 4 else None


@contextlib.contextmanager
def watch_layer(layer: torch.nn.Module, keep: Callable, on_batch: Callable) -> Iterator[None]:
    """A forward hook on `layer` while the block runs: on_batch(keep(inputs, output)) whenever keep returns a
    value; on_batch(None) when it ends. What LayerObserver.capture (every inference-pass observer) uses."""
    def hook(_module, inputs, output):
        kept = keep(inputs, output)
        if kept is not None:
            on_batch(kept)
    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        on_batch(None)


def _batch_rows(batch: KeptBatch) -> int:
    return (batch[0] if isinstance(batch, tuple) else batch).shape[0]


def stack_kept(values: Sequence[KeptBatch]) -> KeptBatch:
    """Kept per-image values as one batch, in the form they were kept (a tensor or a tuple of tensors)."""
    if values and isinstance(values[0], tuple):
        return tuple(torch.stack([v[k] for v in values]) for k in range(len(values[0])))
    return torch.stack(list(values))


class LayerObserver:
    """The hook half of an inference-pass observer: `capture()` hooks `layer` for the pass and holds what
    `keep(inputs, output)` returns of the latest batch; `_take(n)`, in `update()`, hands that batch over once,
    or None when the hook saw nothing or a batch of another size (not the images `update` is about)."""

    def __init__(self, layer: Optional[torch.nn.Module], keep: Callable = output_map):
        self.layer, self.keep = layer, keep
        self._batch: Optional[KeptBatch] = None

    def capture(self):
        """A forward hook on the target layer for the duration of the inference pass."""
        return watch_layer(self.layer, self.keep, self._hold)

    def _hold(self, batch: Optional[KeptBatch]) -> None:
        self._batch = batch

    def _take(self, n: int) -> Optional[KeptBatch]:
        batch, self._batch = self._batch, None
        return batch if batch is not None and n and _batch_rows(batch) == n else None


def _row(batch: KeptBatch, r: int) -> KeptBatch:
    """Image r of a kept batch, copied out of it (so the batch can be freed); 4-D maps as float32."""
    if isinstance(batch, tuple):
        return tuple(t[r].clone() for t in batch)
    return batch[r].float().clone()


class GalleryActivations(LayerObserver):
    """Target-layer activations of the gallery images, kept while the inference pass runs.

    `keep(inputs, output)`, called by a forward hook on `layer`, says what to keep of a batch: a tensor or a
    tuple of tensors, each with the images along dim 0 (the default, `output_map`, keeps 4-D output maps; the
    tail path keeps helpers.model.tail.TailSplit.kept_from_call). Memory is bounded by the number of classes,
    not the dataset: at most num_classes * (2 * n_worst + n_best) images' values, plus one batch."""

    def __init__(self, layer: torch.nn.Module, n_worst: int, n_best: int,
                 keep: Callable[[tuple, object], Optional[KeptBatch]] = output_map):
        super().__init__(layer, keep)
        self.n_worst, self.n_best = int(n_worst), int(n_best)
        self._idx = np.zeros(0, np.int64)
        self._labels = np.zeros(0, np.int64)
        self._preds = np.zeros(0, np.int64)
        self._p_pred = np.zeros(0, np.float32)
        self._p_label = np.zeros(0, np.float32)
        self._maps: dict[int, KeptBatch] = {}
        self.max_held = 0   # most maps held at once (the memory bound, observed)

    def update(self, start: int, probs: np.ndarray, labels: np.ndarray, preds: np.ndarray) -> None:
        """After the batch of images start..start+len(probs): keep the maps of the images still selected."""
        n = len(probs)
        acts = self._take(n)
        if acts is None:
            return
        preds = np.asarray(preds, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        rows = np.arange(n)
        idx = np.concatenate([self._idx, start + rows])
        lab = np.concatenate([self._labels, np.asarray(labels, dtype=np.int64)])
        prd = np.concatenate([self._preds, preds])
        lab_ok = np.clip(labels, 0, probs.shape[1] - 1)
        pp = np.concatenate([self._p_pred, probs[rows, preds]])
        pl = np.concatenate([self._p_label, np.where(labels == lab_ok, probs[rows, lab_ok], -np.inf)])
        keep = gallery_selection(idx, lab, prd, pp, pl, self.n_worst, self.n_best)
        kept = set(idx[keep].tolist())
        for i in [i for i in self._maps if i not in kept]:
            del self._maps[i]
        for i in idx[keep]:
            i = int(i)
            if i >= start and i not in self._maps:
                self._maps[i] = _row(acts, i - start)
        self._idx, self._labels, self._preds, self._p_pred, self._p_label = (
            a[keep] for a in (idx, lab, prd, pp, pl))
        self.max_held = max(self.max_held, len(self._maps))

    def __contains__(self, i: int) -> bool:
        return int(i) in self._maps

    def __len__(self) -> int:
        return len(self._maps)

    def stack(self, indices: Sequence[int]) -> KeptBatch:
        """The kept values of `indices` as one batch, in the form they were kept (a tensor or a tuple)."""
        return stack_kept([self._maps[int(i)] for i in indices])

    def clear(self) -> None:
        self._maps.clear()

    def kept_state(self) -> dict:
        """What the pass kept so far, for another process: the candidates' (global) image indices, labels,
        predictions, p(pred), p(label) and, in the same order, their map values as held (never looked into)."""
        return {"idx": self._idx.copy(), "labels": self._labels.copy(), "preds": self._preds.copy(),
                "p_pred": self._p_pred.copy(), "p_label": self._p_label.copy(),
                "maps": [self._maps[int(i)] for i in self._idx]}

    def merge_states(self, states: Sequence[dict]) -> None:
        """Become the selection over the union of `states` (kept_state() of passes over disjoint image sets,
        e.g. the shards of a distributed pass): by gallery_selection's argument, exactly the selection a
        single pass over all of those images keeps."""
        cols = ("idx", "labels", "preds", "p_pred", "p_label")
        if not states:
            raise ValueError("merge_states needs at least one state")
        union = {c: np.concatenate([np.asarray(s[c]) for s in states]) for c in cols}
        maps = dict(zip(union["idx"].tolist(), [m for s in states for m in s["maps"]]))
        if len(maps) != len(union["idx"]):
            raise ValueError("gallery states overlap: the merged passes must cover disjoint images")
        keep = gallery_selection(*(union[c] for c in cols), self.n_worst, self.n_best)
        self._idx, self._labels, self._preds, self._p_pred, self._p_label = (union[c][keep] for c in cols)
        self._maps = {int(i): maps[int(i)] for i in self._idx}
        self.max_held = max(self.max_held, len(self._maps))


class CamStore:
    def __init__(self, engine_factory: Callable[[str, Optional[str]], "object"], inputs: torch.Tensor,
                 method: str = "gradcam", layer: Optional[str] = None, num_classes: Optional[int] = None):
        """`engine_factory(method, layer)` builds a helpers.model.cams.CamEngine; engines are reused.
        `num_classes` (the model's outputs) bounds the class ids a cached CAM may explain (load())."""
        self._factory = engine_factory
        self._engines: dict[tuple[str, Optional[str]], object] = {}
        self.inputs = inputs
        self.method = method
        self.layer = layer
        self.num_classes = num_classes
        # None: the map is the inference pass's own (PassCams), drawn from its grid when asked for. A 224 px map
        # is 200 KB; a 20,000-image run held ~40,000 of them (13.5 GB peak RSS) when each was stored in full.
        self._cams: dict[tuple[int, int, str, str], Optional[np.ndarray]] = {}
        self._activations: Optional[GalleryActivations] = None
        self.pass_cams = None   # a helpers.model.pass_cams.PassCams, set by the pipeline after the inference pass
        self.pass_inputs = None   # a helpers.model.pass_inputs.PassInputs, likewise
        self._restored_pass = None   # the PassCams grid an identical earlier run saved (load())
        self._cached_paths: dict[tuple[str, str], CamPath] = {}   # (method, layer name) -> path, from the cache
        self.n_computed = 0        # CAMs actually computed (not served from memory or the cache)
        self.n_from_activations = 0  # of those, computed from activations captured in the inference pass

    @property
    def activations(self) -> Optional[GalleryActivations]:
        """The gallery images' activations kept by `capture()`, or None."""
        return self._activations

    @contextlib.contextmanager
    def capture(self, n_worst: int, n_best: int) -> Iterator[Optional[GalleryActivations]]:
        """For the inference pass: `with store.capture(n_worst, n_best) as gallery: run_inference(...,
        gallery=gallery)`. Where the default engine's CAMs can start from values a forward hook on its target
        layer sees (`engine.inference_keep`: the fast Grad-CAM path, or the torch.fx tail path) and the class
        galleries show any image, yields a GalleryActivations that this store keeps (its CAMs then need no
        second forward pass); else yields None. A pass that fails keeps nothing."""
        engine = self.engine() if n_worst + n_best > 0 else None
        keep = getattr(engine, "inference_keep", None)
        if keep is None:
            yield None
            return
        self._activations = GalleryActivations(engine.layer, n_worst, n_best, keep)
        try:
            yield self._activations
        except BaseException:
            self._activations = None
            raise

    def engine(self, method: Optional[str] = None, layer: Optional[str] = None):
        key = (method or self.method, layer if layer is not None else self.layer)
        if key not in self._engines:
            engine = self._factory(*key)
            cached = self._cached_paths.get((key[0], engine.layer_name))
            if cached is not None:
                # Nothing computed yet in this run: report the path the cached CAMs came from.
                engine.cam_path = dataclasses.replace(cached, from_cache=True)
            self._engines[key] = engine
        return self._engines[key]

    def _key(self, idx: int, cls: int, method: str, layer_name: str):
        return (int(idx), int(cls), method, layer_name)

    def get(self, indices: Sequence[int], classes: Sequence[int], method: Optional[str] = None,
            layer: Optional[str] = None, keep: bool = True) -> np.ndarray:
        """CAMs (len(indices), H, W) for image indices[i] explaining class classes[i]. keep=False: maps this call
        computes are returned and not held (bulk statistics over thousands of images: 200 KB a map at 224 px)."""
        indices = [int(i) for i in indices]
        classes = [int(c) for c in classes]
        if len(indices) != len(classes):
            raise ValueError("indices and classes must have the same length")
        engine = self.engine(method, layer)
        method = method or self.method
        layer_name = engine.layer_name
        missing = []
        seen = set()
        for i, c in zip(indices, classes):
            key = self._key(i, c, method, layer_name)
            if key not in self._cams and key not in seen:
                seen.add(key)
                missing.append(key)
        if missing:
            self._compute(engine, missing)
        size = tuple(self.inputs.shape[-2:])
        if not indices:
            return np.zeros((0,) + size, np.float32)
        values = [self._cams[self._key(i, c, method, layer_name)] for i, c in zip(indices, classes)]
        lazy = [n for n, v in enumerate(values) if v is None]
        if lazy:   # one vectorised upsampling for the maps the pass grid holds
            source = self.pass_cams if self.pass_cams is not None else self._restored_pass
            pos, maps = source.lookup([indices[n] for n in lazy], [classes[n] for n in lazy], size)
            if len(pos) != len(lazy):
                raise RuntimeError("CAM store: a map marked as the inference pass's is not in its grid")
            for n, cam in zip(lazy, maps):
                values[n] = cam
        out = np.stack(values)
        if not keep:   # a pass-grid entry costs nothing to hold
            for key in missing:
                if self._cams.get(key) is not None:
                    del self._cams[key]
        return out

    def _compute(self, engine, missing: list) -> None:
        missing = self._from_pass(engine, missing)
        for kept in (self._activations, self.pass_inputs):
            missing = self._from_kept(engine, kept, missing)
        if missing:
            self._from_engine(engine, missing)

    def _from_kept(self, engine, kept, missing: list) -> list:
        """Compute the requests whose image `kept` (GalleryActivations, PassInputs) holds; returns the rest.
        Only values kept by this engine's own rule at its own layer (a fast or tail path refuted since keeps none)."""
        if not missing or kept is None or engine.layer is not kept.layer \
                or kept.keep != getattr(engine, "inference_keep", None):
            return missing
        held = [k for k in missing if k[0] in kept]
        if not held:
            return missing
        idx = [k[0] for k in held]
        cams = engine.compute_from_activations(lambda: self.inputs[torch.as_tensor(idx[:4])], kept.stack(idx),
                                               np.array([k[1] for k in held]), self.inputs.shape[-2:])
        if cams is None:
            return missing
        for key, cam in zip(held, cams):
            self._cams[key] = cam
        self.n_computed += len(held)
        self.n_from_activations += len(held)
        return [k for k in missing if k not in self._cams]

    def _from_engine(self, engine, missing: list) -> None:
        images, rows = np.unique(np.array([k[0] for k in missing], dtype=np.int64), return_inverse=True)
        cams = engine.compute_shared(self.inputs[torch.as_tensor(images)], rows, np.array([k[1] for k in missing]))
        for key, cam in zip(missing, cams):
            self._cams[key] = cam
        self.n_computed += len(missing)

    def _from_pass(self, engine, missing: list) -> list:
        """Mark the requests the inference pass's own Grad-CAMs serve (the image's true or predicted class, on the
        fast path at the pass's layer) as held in its grid; returns the rest. An unverified fast path is first
        verified against pytorch-grad-cam on two of the requests."""
        kept = self.pass_cams
        if not missing or kept is None or not engine.fast or engine.layer is not kept.layer:
            return missing
        if not engine.cam_path.verified:
            self._from_engine(engine, missing[:2])
            missing = missing[2:]
            if not (engine.fast and engine.cam_path.verified):
                return missing
        pos = kept.kept([k[0] for k in missing], [k[1] for k in missing])
        for p in pos.tolist():
            self._cams[missing[p]] = None   # drawn from the pass grid when asked for (get)
        self.n_computed += len(pos)
        self.n_from_activations += len(pos)
        return [k for k in missing if k not in self._cams]

    def prefetch(self, pairs: Iterable[tuple[int, int]], **kwargs) -> None:
        pairs = list(pairs)
        if pairs:
            self.get([p[0] for p in pairs], [p[1] for p in pairs], **kwargs)

    def __len__(self) -> int:
        return len(self._cams)

    # ------------------------------------------------------------------ on-disk cache
    def export(self) -> dict[str, np.ndarray]:
        """Arrays for np.savez (no pickle): every CAM held, stacked, with its (image, class) and
        (method, layer) group, and the path that computed each group (CamPath fields, JSON)."""
        groups = sorted({(m, l) for (_, _, m, l) in self._cams})
        if not groups:
            return {}
        gid = {g: n for n, g in enumerate(groups)}
        keys = list(self._cams)
        paths = dict(self._cached_paths)
        for (method, _), engine in self._engines.items():
            if not engine.cam_path.from_cache:
                paths[(method, engine.layer_name)] = engine.cam_path
        meta = [{"method": m, "layer": l, "path": paths[(m, l)].to_json() if (m, l) in paths else None}
                for m, l in groups]
        full = [k for k in keys if self._cams[k] is not None]
        lazy = [k for k in keys if self._cams[k] is None]
        source = self.pass_cams if self.pass_cams is not None else self._restored_pass
        out = {
            "cam_index": np.array([[k[0], k[1], gid[(k[2], k[3])]] for k in full], dtype=np.int64).reshape(-1, 3),
            "cam_values": (np.stack([self._cams[k] for k in full]).astype(np.float32) if full
                           else np.zeros((0,) + tuple(self.inputs.shape[-2:]), np.float32)),
            "cam_groups": np.array(json.dumps(meta)),
        }
        if lazy and source is not None:   # the pass grid once, and which entries it serves
            out["pass_index"] = np.array([[k[0], k[1], gid[(k[2], k[3])]] for k in lazy], dtype=np.int64)
            out.update(source.arrays())
        return out

    def load(self, arrays: dict) -> int:
        """Inverse of export(); returns the number of CAMs loaded. Raises on malformed input (the caller
        then ignores the cache)."""
        meta = json.loads(str(arrays["cam_groups"]))
        if not isinstance(meta, list) or not all(isinstance(g, dict) and isinstance(g.get("method"), str)
                                                 and isinstance(g.get("layer"), str) for g in meta):
            raise ValueError("CAM cache groups are not (method, layer) records")
        index, values = np.asarray(arrays["cam_index"]), np.asarray(arrays["cam_values"])
        if index.ndim != 2 or index.shape[1] != 3 or len(index) != len(values) or values.ndim != 3:
            raise ValueError("malformed CAM cache")
        if not np.issubdtype(index.dtype, np.integer) or values.dtype != np.float32:
            raise ValueError(f"CAM cache arrays are {index.dtype} and {values.dtype}, not integers and float32")
        if values.shape[1:] != tuple(self.inputs.shape[-2:]):
            raise ValueError("CAM cache made for another image size")
        if len(index):
            # Every id in range (a negative group would silently wrap around), every value finite.
            bounds = (("images", 0, len(self.inputs)), ("classes", 1, self.num_classes), ("groups", 2, len(meta)))
            for what, col, bound in bounds:
                if bound is not None and (index[:, col].min() < 0 or index[:, col].max() >= bound):
                    raise ValueError(f"CAM cache refers to {what} outside 0..{bound - 1}")
            if not np.isfinite(values).all():
                raise ValueError("CAM cache holds NaN or infinite values")
        loaded: dict = {}
        for (i, c, g), cam in zip(index.tolist(), values):
            loaded[(i, c, meta[g]["method"], meta[g]["layer"])] = cam
        restored = None
        if "pass_index" in arrays:
            from helpers.model.pass_cams import PassCams
            restored = PassCams.from_arrays(arrays, len(self.inputs), self.num_classes)
            lazy = np.asarray(arrays["pass_index"])
            if lazy.ndim != 2 or lazy.shape[1] != 3 or not np.issubdtype(lazy.dtype, np.integer):
                raise ValueError("malformed pass CAM index")
            if len(lazy):
                if lazy[:, 0].min() < 0 or lazy[:, 0].max() >= len(self.inputs) or lazy[:, 2].min() < 0 \
                        or lazy[:, 2].max() >= len(meta):
                    raise ValueError("pass CAM index refers to images or groups outside this run")
                if len(restored.kept(lazy[:, 0], lazy[:, 1])) != len(lazy):
                    raise ValueError("pass CAM index asks for maps its grid does not hold")
            for i, c, g in lazy.tolist():
                loaded[(i, c, meta[g]["method"], meta[g]["layer"])] = None
        # Older caches stored the path as text; their groups load without one.
        paths = {(g["method"], g["layer"]): CamPath.from_json(g["path"]) for g in meta if isinstance(g.get("path"), dict)}
        self._cams.update(loaded)
        self._cached_paths.update(paths)
        if restored is not None:
            self._restored_pass = restored
        return len(loaded)


def tail_layer_values(store: CamStore, indices: Sequence[int], true=None, pred=None
                      ) -> Optional[tuple[np.ndarray, Optional[np.ndarray], np.ndarray]]:
    """On the torch.fx tail path of the store's default engine: (target-layer activations as (n, C, h, w),
    ∂(z_pred − z_true)/∂activations when `true` and `pred` are given, logits) of test images `indices`, through
    the tail only, from the values the store's PassInputs kept of them where it holds them, a head pass for the
    rest. None off the tail path."""
    engine = store.engine()
    split = engine.tail_split
    if split is None:
        return None
    idx = np.asarray(indices, dtype=np.int64)
    kept = store.pass_inputs
    held = _held_in_pass(store, engine, idx)
    parts = []
    for from_kept in (True, False):
        rows = np.flatnonzero(held == from_kept)
        if not len(rows):
            continue
        values = (kept.stack(idx[rows].tolist()) if from_kept
                  else head_values(split, store.inputs[torch.as_tensor(idx[rows])].to(engine.device)))
        values = tuple(v.to(engine.device) for v in (values if isinstance(values, tuple) else (values,)))
        t, p = (None, None) if true is None else (np.asarray(true)[rows], np.asarray(pred)[rows])
        parts.append((rows, layer_arrays(split, values, engine.reshape_transform, t, p)))
    order = np.argsort(np.concatenate([rows for rows, _ in parts]), kind="stable")
    return tuple(None if parts[0][1][k] is None else np.concatenate([out[k] for _, out in parts])[order]
                 for k in range(3))


def _held_in_pass(store: CamStore, engine, idx: np.ndarray) -> np.ndarray:
    """Mask over test images idx of those the store's PassInputs kept by `engine`'s own rule at its own layer."""
    kept = store.pass_inputs
    usable = kept is not None and kept.layer is engine.layer and kept.keep == engine.inference_keep
    return np.array([usable and int(i) in kept for i in idx], dtype=bool)


def kept_maps(store: CamStore, indices: Sequence[int]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """On the fast path: a mask over test images `indices` of those whose target-layer map the store's PassInputs
    kept in the inference pass, and those maps as float32 (n_held, C, h, w), in the order of `indices`.
    Elsewhere (the tail path, nothing kept): all False and None."""
    idx = np.asarray(indices, dtype=np.int64)
    engine = store.engine()
    held = _held_in_pass(store, engine, idx) & engine.fast   # the tail path keeps the tail's inputs, not maps
    if not held.any():
        return held, None
    with torch.inference_mode():   # the kept maps may be inference tensors
        return held, store.pass_inputs.stack(idx[held].tolist()).float().numpy()
