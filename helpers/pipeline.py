"""The analysis as a short sequence of steps, shared by the notebook and `python -m helpers analyze`.

Each step computes with the pure functions in metrics/deep_dive/cams, draws with plots, saves
through atomic_io, and returns a `Section` the notebook can display. Nothing here is computed twice:
the CAM store and the on-disk cache serve every later request.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import atomic_io, metrics
from .cam_store import CamStore
from .config import Params
from .data import Dataset, readable, safe_filename
from .errors import ConfigError, OutputError
from .inference import Predictions, resolve_device, run_inference, to_tensor

HIGH_CONFIDENCE = 0.9
CACHE_VERSION = 1


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


class Analysis:
    """fastai-style entry point: `an = Analysis(params)`, then one call per notebook step."""

    def __init__(self, params: Optional[Params] = None, progress: bool = True, **overrides: Any):
        params = params or Params()
        if overrides:
            params = Params(**{**params.to_dict(), **overrides})
        self.params = params
        self.progress = progress
        from .cams import CAM_METHODS
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
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, os.cpu_count() or 1))
        self.written: set[Path] = set()
        self.timings: dict[str, float] = {}
        self.loaded = None
        self.data: Optional[Dataset] = None
        self.inputs: Optional[torch.Tensor] = None
        self.preds: Optional[Predictions] = None
        self.cams: Optional[CamStore] = None
        self.cache_key: Optional[str] = None
        self.cache_hit = False
        self.results: dict[str, Section] = {}

    # ------------------------------------------------------------------ bookkeeping
    def _path(self, *parts: str) -> Path:
        path = self.out.joinpath(*parts)
        self.written.add(path.resolve())
        return path

    def _save_fig(self, fig, *parts: str, dpi: int = 100) -> Path:
        import matplotlib.pyplot as plt
        path = self._path(*parts)
        if hasattr(fig, "savefig"):
            atomic_io.save_figure(fig, path, dpi=dpi, bbox_inches="tight")
            plt.close(fig)
        else:  # PIL image
            with atomic_io.atomic_path(path) as tmp:
                fig.save(tmp, format="PNG", optimize=False)
        return path

    def _timed(self, name: str, start: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    # ------------------------------------------------------------------ 1. model and data
    def load_model(self):
        from .models import load_model
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
        from .data import load_dataset, superclass_mapping
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
        from .models import check_model_fits_data
        shape = tuple(self.inputs.shape[1:])
        check_model_fits_data(self.loaded, shape, self.data.num_classes)

    # ------------------------------------------------------------------ 2. inference (cached)
    def _cache_file(self, suffix: str) -> Path:
        return self.out / ".cache" / f"{self.cache_key}{suffix}"

    def _compute_cache_key(self) -> str:
        p = self.params
        ident = {
            "v": CACHE_VERSION, "weights": self.loaded.weights_sha256, "arch": self.loaded.arch,
            "data": self.data.fingerprint, "mean": list(self.data.mean), "std": list(self.data.std),
            "dataset": p.DATASET, "limit": p.LIMIT, "convert": p.CONVERT_CHANNELS,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]

    def predict(self) -> Predictions:
        """One inference pass over the test set (or the cached result of an identical earlier run)."""
        start = time.perf_counter()
        self.cache_key = self._compute_cache_key()
        cached = None if self.params.FORCE_RECOMPUTE else self._load_cached_predictions()
        if cached is not None:
            self.preds, self.cache_hit = cached, True
        else:
            self.preds = run_inference(
                self.loaded.module, self.inputs, self.data.labels, batch_size=self.params.BATCH_SIZE,
                device=self.device, progress=self.progress,
            )
            self._save_cache_predictions()
        self._make_cam_store()
        self._timed("inference", start)
        return self.preds

    def _load_cached_predictions(self) -> Optional[Predictions]:
        path = self._cache_file(".npz")
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                feats = z["features"] if "features" in z.files else None
                preds = Predictions(logits=z["logits"], probs=z["probs"], preds=z["preds"],
                                    labels=z["labels"], features=feats)
        except Exception:  # a truncated or foreign file: recompute rather than trust it
            return None
        if len(preds.labels) != len(self.data.labels) or not np.array_equal(preds.labels, self.data.labels):
            return None
        return preds

    def _save_cache_predictions(self) -> None:
        arrays = dict(logits=self.preds.logits, probs=self.preds.probs, preds=self.preds.preds,
                      labels=self.preds.labels)
        if self.preds.features is not None:
            arrays["features"] = self.preds.features
        try:
            with atomic_io.atomic_path(self._cache_file(".npz")) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **arrays)
        except OSError:
            pass  # the cache is an optimisation; the analysis itself already has its results

    def _make_cam_store(self) -> None:
        from .cams import CamEngine
        shape = tuple(self.inputs.shape[1:])

        def factory(method: str, layer: Optional[str]):
            return CamEngine(self.loaded.module, method=method, target_layer=layer, input_shape=shape,
                             batch_size=min(self.params.BATCH_SIZE, 128), device=str(self.device))

        self.cams = CamStore(factory, self.inputs, method=self.params.CAM_METHOD, layer=self.params.TARGET_LAYER)
        if self.cache_hit:
            self._load_cached_cams()

    def _load_cached_cams(self) -> None:
        path = self._cache_file("-cams.npz")
        if not path.exists():
            return
        try:
            with np.load(path, allow_pickle=False) as z:
                self.cams.load({k: z[k] for k in z.files})
        except Exception:
            pass

    def save_cam_cache(self) -> None:
        snapshot = self.cams.export() if self.cams is not None else {}
        if not snapshot or self.cache_key is None:
            return
        try:
            with atomic_io.atomic_path(self._cache_file("-cams.npz")) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **snapshot)
        except OSError:
            pass

    # ------------------------------------------------------------------ helpers for steps
    @property
    def names(self) -> list[str]:
        return self.data.display_names

    def overlay(self, idx: int, cam: np.ndarray) -> np.ndarray:
        from .cams import overlay
        return overlay(self.data.images[idx], cam)

    def _conf_title(self, idx: int) -> str:
        p, names = self.preds, self.names
        t, q = int(p.labels[idx]), int(p.preds[idx])
        if t == q:
            return f"#{idx} · {names[t]} ({p.probs[idx, q]:.2f})"
        return f"#{idx} · true: {names[t]} ({p.probs[idx, t]:.2f}) · pred: {names[q]} ({p.probs[idx, q]:.2f})"

    # ------------------------------------------------------------------ 3. confusion
    def confusion(self) -> Section:
        from . import plots
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

        atomic_io.save_csv(table, self._path("per_class_accuracy.csv"))
        atomic_io.save_csv(pairs, self._path("most_confused_pairs.csv"))
        atomic_io.write_text(self._path("per_class_accuracy_interactive.html"), plots.per_class_accuracy_html(table))
        fig = plots.plot_confusion_matrix(cm, self.names, title=f"Confusion matrix — accuracy {pr.accuracy:.1%}")
        sec.figures["confusion_matrix"] = fig
        self._save_fig(fig, "confusion_matrix_full.png", dpi=80)
        fig = plots.plot_top_pairs(pairs)
        sec.figures["top_pairs"] = fig
        self._save_fig(fig, "top_confused_pairs.png")
        sec.files = ["confusion_matrix_full.png", "per_class_accuracy.csv", "per_class_accuracy_interactive.html",
                     "most_confused_pairs.csv", "top_confused_pairs.png"]
        self.results["confusion"] = sec
        self._timed("confusion", start)
        return sec

    # ------------------------------------------------------------------ 4. galleries
    def class_rows(self, cls: int, n_worst: int, n_best: int, method: Optional[str] = None,
                   layer: Optional[str] = None):
        """Gallery rows (worst first, then best) for one class; CAMs come from the store."""
        from .plots import GalleryRow
        pr = self.preds
        worst = list(metrics.rank_worst(pr.labels, pr.preds, pr.probs, cls, n_worst))
        best = [i for i in metrics.rank_best(pr.labels, pr.preds, pr.probs, cls, n_best + n_worst) if i not in worst][:n_best]
        need = [(i, int(pr.preds[i])) for i in worst + best] + [(i, cls) for i in worst if pr.preds[i] != cls]
        kw = dict(method=method, layer=layer)
        self.cams.prefetch(need, **kw)

        def row(i: int) -> GalleryRow:
            q = int(pr.preds[i])
            panels = [(f"CAM → pred: {self.names[q]}", self.overlay(i, self.cams.get([i], [q], **kw)[0]))]
            if q != cls:
                panels.append((f"CAM → true: {self.names[cls]}", self.overlay(i, self.cams.get([i], [cls], **kw)[0])))
            return GalleryRow(image=self.data.images[i], title=self._conf_title(i), panels=panels, ok=q == cls)

        return [row(i) for i in worst], [row(i) for i in best]

    def class_gallery(self, cls: int, n_worst: Optional[int] = None, n_best: Optional[int] = None, **kw):
        from .plots import render_gallery
        p = self.params
        n_worst = p.N_WORST if n_worst is None else n_worst
        n_best = p.N_BEST if n_best is None else n_best
        worst, best = self.class_rows(cls, n_worst, n_best, **kw)
        acc = float((self.preds.preds[self.preds.labels == cls] == cls).mean()) if (self.preds.labels == cls).any() else float("nan")
        sections = [(f"{len(worst)} worst predictions", worst), (f"{len(best)} best predictions", best)]
        return render_gallery(f"Class {cls:03d}: {self.names[cls]} — accuracy {acc:.1%}",
                              [s for s in sections if s[1]])

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
        for cls in tqdm(classes, desc="Class galleries", unit="class", disable=not self.progress):
            img = self.class_gallery(cls)
            name = self.gallery_filename(cls)
            self._save_fig(img, "worst_predictions", name)
            sec.files.append(f"worst_predictions/{name}")
            if cls in shown:
                sec.figures[name] = img
        sec.notes.append(f"CAM path: {self.cams.engine().path} (layer {self.cams.engine().layer_name})")
        self.results["class_galleries"] = sec
        self._timed("class_galleries", start)
        return sec

    def pair_rows(self, true_cls: int, pred_cls: int, n: int, method: Optional[str] = None,
                  layer: Optional[str] = None, finer: bool = False):
        """Rows for a confused pair: original, CAM for the true class, CAM for the predicted class, and
        either their difference or (finer=True) FinerCAM's true-versus-predicted map."""
        from .plots import GalleryRow, difference_panel
        pr = self.preds
        idx = [int(i) for i in metrics.pair_examples(pr.labels, pr.preds, pr.probs, true_cls, pred_cls, n)]
        cam_t = self.cams.get(idx, [true_cls] * len(idx), method=method, layer=layer)
        cam_p = self.cams.get(idx, [pred_cls] * len(idx), method=method, layer=layer)
        extra = None
        if finer and idx:
            extra = self.cams.engine(method, layer).compute_finer(self.inputs[idx], np.full(len(idx), true_cls),
                                                           np.full(len(idx), pred_cls))
        rows = []
        for k, i in enumerate(idx):
            panels = [(f"CAM → true: {self.names[true_cls]}", self.overlay(i, cam_t[k])),
                      (f"CAM → pred: {self.names[pred_cls]}", self.overlay(i, cam_p[k]))]
            if extra is not None:
                panels.append((f"FinerCAM: {self.names[true_cls]} vs {self.names[pred_cls]}", self.overlay(i, extra[k])))
            else:
                panels.append(("difference (true − pred)", difference_panel(cam_t[k], cam_p[k])))
            rows.append(GalleryRow(image=self.data.images[i], title=self._conf_title(i), panels=panels, ok=False))
        return idx, rows, cam_t, cam_p, extra

    def pair_galleries(self) -> Section:
        from .plots import render_gallery
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
        from .cams import faithfulness
        scores = faithfulness(self.loaded.module, self.inputs[idx], np.asarray(classes), cams)
        return float(np.nanmean(scores))

    # ------------------------------------------------------------------ 5. deep dive
    def deep_dive(self) -> Section:
        from .deep_dive_steps import run_deep_dive
        start = time.perf_counter()
        sec = run_deep_dive(self)
        self.results["deep_dive"] = sec
        self._timed("deep_dive", start)
        return sec

    # ------------------------------------------------------------------ 6. summary, recommendations, index
    def report(self) -> Section:
        from . import report
        start = time.perf_counter()
        sec = report.write_reports(self)
        self.results["report"] = sec
        self.save_cam_cache()
        self._timed("report", start)
        return sec

    def explorer(self):
        from .widget import ClassExplorer
        return ClassExplorer(self)

    def run_all(self) -> dict[str, Section]:
        """Every step in order: what `python -m helpers analyze` runs."""
        if self.loaded is None:
            self.load_model()
        if self.data is None:
            self.load_data()
        self.predict()
        self.confusion()
        self.class_galleries()
        self.pair_galleries()
        self.deep_dive()
        self.report()
        return self.results
