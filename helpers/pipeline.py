"""The analysis as a short sequence of steps, shared by the notebook and `python -m helpers analyze`.

Each step computes with the pure functions in metrics/deep_dive/cams, draws with plots, saves
through atomic_io, and returns a `Section` the notebook can display. Nothing here is computed twice:
the CAM store and the on-disk cache serve every later request.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from helpers.files import atomic
from helpers.files import png
from helpers.files import background
from helpers.compute import metrics
from helpers.model.cam_store import CamStore, GalleryActivations
from helpers.config import Params
from helpers.data.datasets import Dataset, readable, safe_filename
from helpers.errors import ConfigError, OutputError
from helpers.model.inference import Predictions, default_threads, resolve_device, run_inference, to_tensor

HIGH_CONFIDENCE = 0.9
CACHE_VERSION = 3   # bump when a cached computation changes (3: occlusion on non-overlapping windows)
CACHE_KEEP = 4   # cache entries (distinct model/data/params) kept in OUTPUT_DIR/.cache
_RENDER_CODE: list = [None]   # digest of the drawing code (plots.py, PNG level), computed once


@dataclass
class Section:
    """What one step produced: numbers, figures to show inline, and the files it wrote."""
    title: str
    values: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)    # name -> matplotlib Figure or PIL.Image
    files: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def show(self, names: Optional[list[str]] = None) -> None:
        from IPython.display import display
        for note in self.notes:
            print(note)
        for name, fig in self.figures.items():
            if names is None or name in names:
                display(fig)


def check_writable(folder: Path) -> None:
    """Fail before any compute if the outputs cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OutputError(
            f"The output folder {folder.resolve()} is not writable ({exc.strerror or exc}). "
            "Set OUTPUT_DIR to a folder you can write to."
        ) from None


# ---------------------------------------------------------------------- memo values <-> npz (no pickle)
def _jsonable_key(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # field by field: str() of a dataclass would print its arrays, summarised with "..." when large
        return {"__dataclass__": type(value).__qualname__,
                **{f.name: _jsonable_key(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, np.ndarray) or isinstance(value, torch.Tensor):
        arr = np.ascontiguousarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value)
        return {"sha1": hashlib.sha1(arr.view(np.uint8).ravel()).hexdigest(), "shape": list(arr.shape),
                "dtype": str(arr.dtype)}
    if isinstance(value, dict):
        return {str(k): _jsonable_key(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple, set)):
        items = sorted(value) if isinstance(value, set) else value
        return [_jsonable_key(v) for v in items]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _digest(key: Any) -> str:
    return hashlib.sha1(json.dumps(_jsonable_key(key), sort_keys=True, default=str).encode()).hexdigest()[:16]


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


class Analysis:
    """fastai-style entry point: `an = Analysis(params)`, then one call per notebook step."""

    def __init__(self, params: Optional[Params] = None, progress: bool = True, **overrides: Any):
        params = params or Params()
        if overrides:
            params = Params(**{**params.to_dict(), **overrides})
        self.params = params
        self.progress = progress
        from helpers.model.cams import CAM_METHODS
        if params.CAM_METHOD not in CAM_METHODS:
            raise ConfigError(
                f"Unknown CAM_METHOD {params.CAM_METHOD!r}. Valid choices: {', '.join(CAM_METHODS)}."
            )
        for name in ("BATCH_SIZE", "N_WORST", "N_BEST", "TOP_PAIRS", "N_PAIR_GALLERIES", "GROUP_SIZE"):
            value = getattr(params, name)
            if not isinstance(value, int) or value < (1 if name in ("BATCH_SIZE", "GROUP_SIZE") else 0):
                raise ConfigError(f"{name} must be a non-negative integer (got {value!r}).")
        self.out = Path(params.OUTPUT_DIR)
        check_writable(self.out)
        self.device = resolve_device(params.DEVICE)
        if self.device.type == "cpu":   # the free CPUs: oversubscribed OpenMP threads stall each other
            torch.set_num_threads(default_threads())
        self.threads = torch.get_num_threads()
        self.written: set[Path] = set()
        self.timings: dict[str, float] = {}
        self.loaded = None
        self.data: Optional[Dataset] = None
        self.inputs: Optional[torch.Tensor] = None
        self.preds: Optional[Predictions] = None
        self.cams: Optional[CamStore] = None
        self.cache_key: Optional[str] = None
        self.cache_hit = False
        self.cache_stats = {"memo_hits": 0, "memo_misses": 0, "memo_missed": [], "cams_loaded": 0, "outputs_kept": 0,
                            "rejected": []}
        self._memo: dict[str, Any] = {}
        self._outputs: dict[str, str] = {}          # gallery file -> digest of what was drawn into it
        self._outputs_before: dict[str, list] = {}  # the same from the cache: [digest, size, mtime_ns]
        self._writer = background.BackgroundWriter()   # PNGs are encoded while the next step computes
        self.results: dict[str, Section] = {}

    # ------------------------------------------------------------------ bookkeeping
    def _path(self, *parts: str) -> Path:
        path = self.out.joinpath(*parts)
        self.written.add(path.resolve())
        return path

    def _save_fig(self, fig, *parts: str, dpi: int = 100, tight: Optional[bool] = None) -> Path:
        """tight=None: bbox_inches="tight" unless the figure has constrained layout, which already fits
        everything in ("tight" would cost a second full draw); tight=False for figures laid out by hand."""
        import matplotlib.pyplot as plt
        path = self._path(*parts)
        if hasattr(fig, "savefig"):   # rendered by the writer's worker process
            if tight is None:
                engine = fig.get_layout_engine() if hasattr(fig, "get_layout_engine") else None
                tight = type(engine).__name__ != "ConstrainedLayoutEngine"
            self._writer.figure(fig, path, dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
            plt.close(fig)
        else:  # PIL image: encoded on the writer's thread
            self._writer.image(fig, path)
        return path

    def _save_rendered(self, render, args: tuple, *parts: str) -> Path:
        """Have the writer's worker process draw `render(*args)` (a PIL picture) and save it: for pictures
        that are saved but not shown, so this process goes on computing meanwhile."""
        path = self._path(*parts)
        self._writer.rendered(render, args, path)
        return path

    def _flush_writes(self) -> None:
        """Wait for the PNGs being written in the background (report() calls it before listing the files)."""
        try:
            self._writer.flush()
        except Exception as exc:
            raise OutputError(f"Could not write an output file under {self.out.resolve()} ({exc}). "
                              "Check the free disk space and the folder's permissions.") from exc

    def _timed(self, name: str, start: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    # ------------------------------------------------------------------ 1. model and data
    def load_model(self):
        from helpers.model.load import load_model
        start = time.perf_counter()
        p = self.params
        self.loaded = load_model(
            model_path=p.MODEL_PATH, arch=p.ARCH, num_classes=self._expected_classes(),
            device=str(self.device), allow_unsafe_pickle=p.ALLOW_UNSAFE_PICKLE, model_kwargs=p.MODEL_KWARGS,
        )
        self._timed("load_model", start)
        if self.data is not None:
            self._check_fit()
        return self.loaded

    def _expected_classes(self) -> int:
        if self.data is not None:
            return self.data.num_classes
        return {"cifar100": 100, "cifar10": 10, "fashion_mnist": 10, "mnist": 10}.get(self.params.DATASET, 100)

    def load_data(self) -> Dataset:
        from helpers.data.datasets import load_dataset, superclass_mapping
        start = time.perf_counter()
        p = self.params
        data = load_dataset(
            p.DATASET, root=p.DATA_ROOT, download=p.DOWNLOAD, mean=p.MEAN, std=p.STD,
            limit=p.LIMIT, convert_channels=p.CONVERT_CHANNELS,
        )
        if p.SUPERCLASS_MAP:
            data = superclass_mapping(data, p.SUPERCLASS_MAP)
        self.data = data
        self.inputs = to_tensor(data.images, data.mean, data.std)
        self._timed("load_data", start)
        if self.loaded is not None:
            self._check_fit()
        return data

    def _check_fit(self) -> None:
        from helpers.model.load import check_model_fits_data
        shape = tuple(self.inputs.shape[1:])
        check_model_fits_data(self.loaded, shape, self.data.num_classes)

    # ------------------------------------------------------------------ 2. inference (cached)
    # OUTPUT_DIR/.cache/<key>.npz holds the predictions and features, written right after inference;
    # <key>-derived.npz the CAMs and the memoised deep-dive results, written by report(). Both are written
    # atomically (temporary file, fsync, rename) and fully read and checked before use: a truncated or
    # foreign file is ignored and recomputed, never trusted.
    def _cache_file(self, suffix: str) -> Path:
        return self.out / ".cache" / f"{self.cache_key}{suffix}"

    def _compute_cache_key(self) -> str:
        """Hash of what the predictions depend on: the checkpoint bytes, the architecture and its arguments,
        the data (a hash of images and labels) and the preprocessing. CAM- and deep-dive-specific parameters
        (CAM_METHOD, TARGET_LAYER, SEED, EMBEDDING, group, ...) key the entries inside the derived cache."""
        p = self.params
        ident = {
            "v": CACHE_VERSION, "weights": self.loaded.weights_sha256, "arch": self.loaded.arch,
            "model_kwargs": p.MODEL_KWARGS, "data": self.data.fingerprint, "n": len(self.data.labels),
            "shape": list(self.inputs.shape[1:]), "mean": [float(v) for v in self.data.mean],
            "std": [float(v) for v in self.data.std], "dataset": p.DATASET, "limit": p.LIMIT,
            "convert": p.CONVERT_CHANNELS,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def _cache_meta(self, kind: str) -> np.ndarray:
        return np.array(json.dumps({"v": CACHE_VERSION, "key": self.cache_key, "kind": kind}))

    def _read_cache(self, suffix: str, kind: str) -> Optional[dict]:
        """Every array of a cache file, or None when it is missing, truncated, corrupt or not ours."""
        path = self._cache_file(suffix)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}   # reads (and CRC-checks) every member now
            meta = json.loads(str(arrays.pop("meta")))
            if meta != json.loads(str(self._cache_meta(kind))):
                raise ValueError(f"cache made for {meta}")
            return arrays
        except Exception as exc:  # truncated zip, bad CRC, missing member, foreign file: recompute
            self.cache_stats["rejected"].append(f"{path.name}: {type(exc).__name__}")
            return None

    def _write_cache(self, suffix: str, kind: str, arrays: dict) -> None:
        try:
            with atomic.atomic_path(self._cache_file(suffix), fsync=True) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, meta=self._cache_meta(kind), **arrays)
            self._prune_cache()
        except OSError:
            pass  # the cache is an optimisation; the analysis itself already has its results

    def _prune_cache(self) -> None:
        """Keep the CACHE_KEEP most recently written cache entries (one per model/data/params)."""
        folder = self.out / ".cache"
        keys: dict[str, float] = {}
        for f in folder.glob("*.npz"):
            if f.name.startswith("."):   # another run's file still being written
                continue
            key = f.name.split("-", 1)[0].split(".", 1)[0]
            keys[key] = max(keys.get(key, 0.0), f.stat().st_mtime)
        for key in sorted(keys, key=keys.get, reverse=True)[CACHE_KEEP:]:
            for f in folder.glob(f"{key}[.-]*npz"):
                f.unlink(missing_ok=True)

    def predict(self, cached_only: bool = False) -> Predictions:
        """One inference pass over the test set (or the cached result of an identical earlier run).
        The same pass keeps the penultimate features and, for the fast Grad-CAM path, the target-layer
        activations of the images the class galleries will show. `cached_only=True` (rebuilding from saved
        results) reads the cache and raises OutputError instead of running inference when it is missing."""
        start = time.perf_counter()
        self.cache_key = self._compute_cache_key()
        use_cache = cached_only or not self.params.FORCE_RECOMPUTE
        cached = self._load_cached_predictions() if use_cache else None
        if cached is None and cached_only:
            raise OutputError(
                f"No saved predictions for this model and data in {(self.out / '.cache').resolve()}. Run the "
                "analysis first with the same parameters (Analysis(params).run_all() or python -m helpers "
                "analyze), or point OUTPUT_DIR at the folder that run wrote.")
        self._make_cam_store()
        if cached is not None:
            self.preds, self.cache_hit = cached, True
            self._load_derived_cache()
        else:
            self.cache_hit = False
            # Nothing else runs during inference: warming up the figure worker and the deep dive's imports here
            # (UMAP's numba kernels, captum, cleanlab) slowed ResNet-56 inference on 2 cores from ~13 s to ~17 s,
            # more than the ~2 s it saved later (GIL and OpenMP threads contend).
            if self.device.type == "cpu":
                torch.set_num_threads(self.threads)   # the pass gets every free core
            self.preds = run_inference(
                self.loaded.module, self.inputs, self.data.labels, batch_size=self.params.BATCH_SIZE,
                device=self.device, progress=self.progress, gallery=self._gallery_activations(),
            )
            self._save_cache_predictions()
        if self.device.type == "cpu":
            # What follows runs the model on a few dozen images at a time, where extra OpenMP threads mostly spin,
            # while the PNG writer thread and the figure worker need cores: half the threads (1 of 2 here)
            # took ResNet-56's post-inference steps from 10.1 s to 9.2 s (mean of 3 runs each).
            torch.set_num_threads(max(1, self.threads // 2))
        # The figure worker starts now: its interpreter imports matplotlib (~1 s, partly reading files) while the
        # confusion step runs, instead of when the first figure is sent. (A thread importing the deep dive's
        # libraries here was no gain: it holds the GIL, and the galleries waited.)
        self._writer.warm_up()
        self._timed("inference", start)
        return self.preds

    def _gallery_activations(self) -> Optional[GalleryActivations]:
        """Where the fast Grad-CAM path applies, keep the gallery images' activations in the inference pass."""
        p = self.params
        if p.N_WORST + p.N_BEST == 0:
            return None
        engine = self.cams.engine()
        if not engine.fast:
            return None
        self.cams.activations = GalleryActivations(engine.layer, p.N_WORST, p.N_BEST)
        return self.cams.activations

    def _load_cached_predictions(self) -> Optional[Predictions]:
        z = self._read_cache(".npz", "predictions")
        if z is None:
            return None
        try:
            preds = Predictions(logits=z["logits"], probs=z["probs"], preds=z["preds"],
                                labels=z["labels"], features=z.get("features"))
            n = len(self.data.labels)
            ok = (preds.logits.ndim == 2 and preds.logits.shape[0] == n and preds.probs.shape == preds.logits.shape
                  and preds.preds.shape == (n,) and np.array_equal(preds.labels, self.data.labels)
                  and (preds.features is None or len(preds.features) == n))
        except Exception:
            ok = False
        if not ok:
            self.cache_stats["rejected"].append(f"{self.cache_key}.npz: arrays do not fit the data")
            return None
        return preds

    def _save_cache_predictions(self) -> None:
        arrays = dict(logits=self.preds.logits, probs=self.preds.probs, preds=self.preds.preds,
                      labels=self.preds.labels)
        if self.preds.features is not None:
            arrays["features"] = self.preds.features
        self._write_cache(".npz", "predictions", arrays)

    def _make_cam_store(self) -> None:
        from helpers.model.cams import CamEngine
        shape = tuple(self.inputs.shape[1:])

        def factory(method: str, layer: Optional[str]):
            return CamEngine(self.loaded.module, method=method, target_layer=layer, input_shape=shape,
                             batch_size=min(self.params.BATCH_SIZE, 128), device=str(self.device))

        self.cams = CamStore(factory, self.inputs, method=self.params.CAM_METHOD, layer=self.params.TARGET_LAYER)

    def _load_derived_cache(self) -> None:
        z = self._read_cache("-derived.npz", "derived")
        if z is None:
            return
        try:
            memo = {key: _decode(value, z) for key, value in json.loads(str(z["memo"])).items()}
            outputs = json.loads(str(z["outputs"])) if "outputs" in z else {}
            n = self.cams.load(z) if "cam_index" in z else 0
        except Exception as exc:
            self.cache_stats["rejected"].append(f"{self.cache_key}-derived.npz: {type(exc).__name__}")
            return
        self._memo.update(memo)
        self._outputs_before = outputs
        self.cache_stats["cams_loaded"] = n

    def save_cam_cache(self) -> None:
        """Write the CAMs and memoised results next to the outputs (report() calls it)."""
        if self.cache_key is None or self.cams is None:
            return
        arrays = dict(self.cams.export())
        memo = {}
        for key, value in self._memo.items():
            try:
                memo[key] = _encode(value, arrays)
            except TypeError:   # a value the cache cannot hold without pickle: recomputed next time
                continue
        arrays["memo"] = np.array(json.dumps(memo))
        outputs = {}
        for rel, digest in self._outputs.items():
            try:
                st = (self.out / rel).stat()
            except OSError:
                continue
            outputs[rel] = [digest, st.st_size, st.st_mtime_ns]
        arrays["outputs"] = np.array(json.dumps(outputs))
        self._write_cache("-derived.npz", "derived", arrays)

    def _output_unchanged(self, rel: str, content: Any) -> bool:
        """True when the file `rel` is what an earlier run drew from exactly this `content` with the same
        drawing code, and has not been touched since (size and mtime as that run recorded them): a cached
        re-run then keeps the file instead of drawing it again. Records the content's digest either way."""
        from helpers.plots import figures as plots
        if _RENDER_CODE[0] is None:
            _RENDER_CODE[0] = hashlib.sha1(Path(plots.__file__).read_bytes()
                                           + str(png.PNG_COMPRESS_LEVEL).encode()).hexdigest()
        digest = _digest([_RENDER_CODE[0], content])
        self._outputs[rel] = digest
        before = self._outputs_before.get(rel)
        if not before or before[0] != digest or self.params.FORCE_RECOMPUTE:
            return False
        try:
            st = (self.out / rel).stat()
        except OSError:
            return False
        kept = [st.st_size, st.st_mtime_ns] == before[1:]
        self.cache_stats["outputs_kept"] += kept
        return kept

    def cached(self, name: str, compute: Callable[[], Any], *key: Any) -> Any:
        """`compute()`, or its result from an identical earlier run: same model, data and preprocessing
        (the cache key) and the same `key` parts (every other input of `compute`: indices, classes, method,
        seed, ...; arrays are hashed by content). Values: arrays, numbers, strings, None, and lists, tuples
        and str-keyed dicts of those. FORCE_RECOMPUTE ignores stored results."""
        mkey = f"{name}:{_digest(key)}"
        if mkey in self._memo:
            self.cache_stats["memo_hits"] += 1
            return self._memo[mkey]
        value = compute()
        self.cache_stats["memo_misses"] += 1
        self.cache_stats["memo_missed"].append(name)
        self._memo[mkey] = value
        return value

    # ------------------------------------------------------------------ helpers for steps
    @property
    def names(self) -> list[str]:
        if getattr(self, "_names_of", None) is not self.data:   # every title asks: build the list once per dataset
            self._names, self._names_of = self.data.display_names, self.data
        return self._names

    def overlay(self, idx: int, cam: np.ndarray) -> np.ndarray:
        from helpers.model.cams import overlay
        return overlay(self.data.images[idx], cam)

    def overlays(self, indices: Sequence[int], cams: Sequence[np.ndarray]) -> list[np.ndarray]:
        """overlay() of many images at once (one vectorised pass, the same pixels)."""
        from helpers.model.cams import overlay_many
        return list(overlay_many([self.data.images[i] for i in indices], cams)) if len(indices) else []

    def _conf_title(self, idx: int) -> str:
        p, names = self.preds, self.names
        t, q = int(p.labels[idx]), int(p.preds[idx])
        if t == q:
            return f"#{idx} · {names[t]} ({p.probs[idx, q]:.2f})"
        return f"#{idx} · true: {names[t]} ({p.probs[idx, t]:.2f}) · pred: {names[q]} ({p.probs[idx, q]:.2f})"

    # ------------------------------------------------------------------ 3. confusion
    def confusion(self) -> Section:
        from helpers.compute import ordering
        from helpers.plots import figures as plots
        from helpers.steps import report
        start = time.perf_counter()
        p, data, pr = self.params, self.data, self.preds
        cm = metrics.confusion_matrix(pr.labels, pr.preds, data.num_classes)
        table = metrics.per_class_table(pr.labels, pr.preds, pr.probs, data.class_names,
                                        data.fine_to_coarse, data.coarse_names)
        pairs = metrics.most_confused(cm, data.class_names, k=p.TOP_PAIRS, fine_to_coarse=data.fine_to_coarse)
        sec = Section("Confusion")
        sec.values.update(cm=cm, table=table, pairs=pairs, accuracy=pr.accuracy)
        if data.fine_to_coarse is not None:
            sec.values["superclass_share"] = metrics.superclass_error_share(pr.labels, pr.preds, data.fine_to_coarse)
        sec.values["high_conf"] = metrics.high_confidence_errors(pr.labels, pr.preds, pr.probs, HIGH_CONFIDENCE)
        # rows/columns of the interactive matrix: confusable classes side by side
        order, order_how = ordering.confusion_order(cm, data.fine_to_coarse)
        sec.values.update(order=order, order_how=order_how, row_pct=ordering.row_percent(cm))

        atomic.save_csv(table, self._path("per_class_accuracy.csv"))
        atomic.save_csv(pairs, self._path("most_confused_pairs.csv"))
        js = report.ship_plotlyjs(self)  # one plotly.js next to the pages instead of 4.8 MB inside each
        sec.values["per_class_figure"] = plots.per_class_accuracy_figure(table)   # index.html embeds it too
        atomic.write_text(self._path("per_class_accuracy_interactive.html"),
                             plots.per_class_accuracy_html(table, js, fig=sec.values["per_class_figure"]))
        atomic.write_text(self._path("confusion_matrix_interactive.html"),
                             plots.confusion_heatmap_html(report.confusion_figure(self, sec.values), js))
        fig = plots.plot_confusion_matrix(cm, self.names, title=f"Confusion matrix — accuracy {pr.accuracy:.1%}")
        sec.figures["confusion_matrix"] = fig
        self._save_fig(fig, "confusion_matrix_full.png", dpi=80, tight=False)   # constrained, or fixed margins
        fig = plots.plot_top_pairs(pairs)
        sec.figures["top_pairs"] = fig
        self._save_fig(fig, "top_confused_pairs.png")
        sec.files = ["confusion_matrix_full.png", "per_class_accuracy.csv", "per_class_accuracy_interactive.html",
                     "confusion_matrix_interactive.html", "most_confused_pairs.csv", "top_confused_pairs.png"]
        self.results["confusion"] = sec
        self._timed("confusion", start)
        return sec

    # ------------------------------------------------------------------ 4. galleries
    def class_rows(self, cls: int, n_worst: int, n_best: int, method: Optional[str] = None,
                   layer: Optional[str] = None):
        """Gallery rows (worst first, then best) for one class; CAMs come from the store."""
        from helpers.plots.figures import GalleryRow
        pr = self.preds
        worst = list(metrics.rank_worst(pr.labels, pr.preds, pr.probs, cls, n_worst))
        best = [i for i in metrics.rank_best(pr.labels, pr.preds, pr.probs, cls, n_best + n_worst) if i not in worst][:n_best]
        need = [(i, int(pr.preds[i])) for i in worst + best] + [(i, cls) for i in worst if pr.preds[i] != cls]
        images = [i for i, _ in need]
        shown = dict(zip(need, self.overlays(images, self.cams.get(images, [c for _, c in need], method=method,
                                                                      layer=layer))))

        def row(i: int) -> GalleryRow:
            q = int(pr.preds[i])
            panels = [(f"CAM → pred: {self.names[q]}", shown[(i, q)])]
            if q != cls:
                panels.append((f"CAM → true: {self.names[cls]}", shown[(i, cls)]))
            return GalleryRow(image=self.data.images[i], title=self._conf_title(i), panels=panels, ok=q == cls)

        return [row(i) for i in worst], [row(i) for i in best]

    def class_gallery(self, cls: int, n_worst: Optional[int] = None, n_best: Optional[int] = None, **kw):
        from helpers.plots.figures import render_gallery
        return render_gallery(*self._class_gallery_content(cls, n_worst, n_best, **kw))

    def _class_gallery_content(self, cls: int, n_worst: Optional[int] = None, n_best: Optional[int] = None, **kw):
        """(title, sections) that plots.render_gallery draws for one class."""
        p = self.params
        n_worst = p.N_WORST if n_worst is None else n_worst
        n_best = p.N_BEST if n_best is None else n_best
        worst, best = self.class_rows(cls, n_worst, n_best, **kw)
        acc = float((self.preds.preds[self.preds.labels == cls] == cls).mean()) if (self.preds.labels == cls).any() else float("nan")
        sections = [(f"{len(worst)} worst predictions", worst), (f"{len(best)} best predictions", best)]
        return f"Class {cls:03d}: {self.names[cls]} — accuracy {acc:.1%}", [s for s in sections if s[1]]

    def gallery_filename(self, cls: int) -> str:
        return f"class_{cls:03d}_{safe_filename(self.data.class_names[cls])}.png"

    def class_galleries(self, show: int = 3) -> Section:
        """Best and worst predictions with CAMs for every class (one PNG per class)."""
        from tqdm.auto import tqdm
        start = time.perf_counter()
        p, pr = self.params, self.preds
        classes = range(self.data.num_classes)
        # Every CAM the galleries need, in one batched request.
        need = []
        for cls in classes:
            worst = metrics.rank_worst(pr.labels, pr.preds, pr.probs, cls, p.N_WORST)
            best = metrics.rank_best(pr.labels, pr.preds, pr.probs, cls, p.N_BEST + p.N_WORST)
            need += [(int(i), int(pr.preds[i])) for i in list(worst) + list(best)]
            need += [(int(i), cls) for i in worst if pr.preds[i] != cls]
        self.cams.prefetch(need)
        sec = Section("Per-class galleries")
        order = np.argsort(self.results["confusion"].values["table"]["accuracy"].to_numpy(), kind="stable") \
            if "confusion" in self.results else np.arange(self.data.num_classes)
        shown = set(int(c) for c in order[:show])
        from helpers.plots.figures import render_gallery
        for cls in tqdm(classes, desc="Class galleries", unit="class", disable=not self.progress):
            name = self.gallery_filename(cls)
            rel = f"worst_predictions/{name}"
            sec.files.append(rel)
            content = self._class_gallery_content(cls)
            if cls not in shown and self._output_unchanged(rel, content):
                self._path("worst_predictions", name)   # still this run's output (kept by the manifest)
                continue
            if cls in shown:
                sec.figures[name] = render_gallery(*content)
                self._save_fig(sec.figures[name], "worst_predictions", name)
            else:   # drawn and encoded by the figure worker: ~1 s of ResNet-56's run off this process
                self._save_rendered(render_gallery, content, "worst_predictions", name)
        engine, store = self.cams.engine(), self.cams
        how = (f"; {store.n_from_activations} of {store.n_computed} CAMs from activations kept in the inference pass"
               if store.n_from_activations else "")
        sec.notes.append(f"CAM path: {engine.path} (layer {engine.layer_name}{how})")
        self.results["class_galleries"] = sec
        self._timed("class_galleries", start)
        return sec

    def pair_rows(self, true_cls: int, pred_cls: int, n: int, method: Optional[str] = None,
                  layer: Optional[str] = None, finer: bool = False):
        """Rows for a confused pair: original, CAM for the true class, CAM for the predicted class, and
        either their difference or (finer=True) FinerCAM's true-versus-predicted map."""
        from helpers.plots.figures import GalleryRow, difference_panel
        pr = self.preds
        idx = [int(i) for i in metrics.pair_examples(pr.labels, pr.preds, pr.probs, true_cls, pred_cls, n)]
        cam_t = self.cams.get(idx, [true_cls] * len(idx), method=method, layer=layer)
        cam_p = self.cams.get(idx, [pred_cls] * len(idx), method=method, layer=layer)
        extra = None
        if finer and idx:
            engine = self.cams.engine(method, layer)
            extra = self.cached(
                "finercam", lambda: engine.compute_finer(self.inputs[idx], np.full(len(idx), true_cls),
                                                         np.full(len(idx), pred_cls)),
                engine.method, engine.layer_name, idx, true_cls, pred_cls)
        rows = []
        over_t, over_p = self.overlays(idx, cam_t), self.overlays(idx, cam_p)
        over_x = self.overlays(idx, extra) if extra is not None else None
        for k, i in enumerate(idx):
            panels = [(f"CAM → true: {self.names[true_cls]}", over_t[k]),
                      (f"CAM → pred: {self.names[pred_cls]}", over_p[k])]
            if extra is not None:
                panels.append((f"FinerCAM: {self.names[true_cls]} vs {self.names[pred_cls]}", over_x[k]))
            else:
                panels.append(("difference (true − pred)", difference_panel(cam_t[k], cam_p[k])))
            rows.append(GalleryRow(image=self.data.images[i], title=self._conf_title(i), panels=panels, ok=False))
        return idx, rows, cam_t, cam_p, extra

    def pair_galleries(self) -> Section:
        from helpers.plots.figures import render_gallery
        start = time.perf_counter()
        p = self.params
        pairs = self.results["confusion"].values["pairs"]
        sec = Section("Confused pairs")
        faith_idx, faith_cls, faith_cams = [], [], []
        for k, row in enumerate(pairs.head(p.N_PAIR_GALLERIES).itertuples(), start=1):
            t, q = int(row.true_id), int(row.pred_id)
            idx, rows, cam_t, cam_p, _ = self.pair_rows(t, q, p.PAIR_EXAMPLES)
            title = (f"Pair {k}: {self.names[t]} → {self.names[q]} — {row.count} errors "
                     f"({row.share_of_true:.1%} of {self.names[t]})")
            img = render_gallery(title, [(f"{len(rows)} most confident {self.names[t]} → {self.names[q]} errors", rows)])
            name = f"confused_pair_{k}_{safe_filename(self.data.class_names[t])}_to_{safe_filename(self.data.class_names[q])}.png"
            self._save_fig(img, name)
            sec.files.append(name)
            sec.figures[name] = img
            faith_idx += idx
            faith_cls += [q] * len(idx)
            faith_cams.append(cam_p)
        if faith_idx:
            sec.values["faithfulness"] = {p.CAM_METHOD: self._faithfulness(faith_idx, faith_cls, np.concatenate(faith_cams))}
        self.results["pair_galleries"] = sec
        self._timed("pair_galleries", start)
        return sec

    def _faithfulness(self, idx, classes, cams) -> float:
        from helpers.model.cams import faithfulness

        def compute() -> float:
            # p(class) on the originals is known from the inference pass: only the perturbed images are run
            before = self.preds.probs[np.asarray(idx, dtype=np.int64), np.asarray(classes, dtype=np.int64)]
            scores = faithfulness(self.loaded.module, self.inputs[idx], np.asarray(classes), cams, scores_before=before)
            return float(np.nanmean(scores))
        return self.cached("faithfulness", compute, list(idx), list(classes), np.asarray(cams, np.float32))

    # ------------------------------------------------------------------ 5. deep dive
    def deep_dive(self) -> Section:
        from helpers.steps.deep_dive import run_deep_dive
        start = time.perf_counter()
        sec = run_deep_dive(self)
        self.results["deep_dive"] = sec
        self._timed("deep_dive", start)
        return sec

    # ------------------------------------------------------------------ 6. summary, recommendations, index
    def report(self) -> Section:
        from helpers.steps import report
        start = time.perf_counter()
        self._flush_writes()   # PNGs are written in the background; the index and manifest need them on disk
        sec = report.write_reports(self)
        self.results["report"] = sec
        self.save_cam_cache()
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)   # the analysis is done: give the session its threads back
        self._timed("report", start)
        return sec

    def explorer(self):
        from helpers.widget import ClassExplorer
        return ClassExplorer(self)

    def run_all(self) -> dict[str, Section]:
        """Every step in order: what `python -m helpers analyze` runs."""
        if self.loaded is None:
            self.load_model()
        if self.data is None:
            self.load_data()
        try:
            self.predict()
            self.confusion()
            self.class_galleries()
            self.pair_galleries()
            self.deep_dive()
            self.report()
        except BaseException:
            self._writer.close(raise_errors=False)   # the step's own error is the one to report
            raise
        self._writer.close()   # also stops the figure worker process
        return self.results
