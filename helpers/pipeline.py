"""The analysis as a short sequence of steps, shared by the notebook and `python -m helpers analyze`.

`Analysis` loads the model and the data, runs the one inference pass, builds the `Run` context once and
calls one step function (helpers/steps/) per notebook section with the run and the upstream results.
Nothing is computed twice: the CAM store and the run cache serve every later request.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch

from helpers.config import Params
from helpers.data.datasets import Dataset, class_count, load_dataset, superclass_mapping
from helpers.errors import ConfigError, OutputError
from helpers.files.cache import RunCache
from helpers.files.outputs import Outputs
from helpers.model.cam_store import CamStore
from helpers.model import distributed
from helpers.model.cams import CAM_METHODS
from helpers.model.inference import (Predictions, autocast_dtype, default_threads, model_inputs, resolve_device,
                                     run_inference)
from helpers.model.load import LoadedModel, check_model_fits_data, load_model
from helpers.model.sanity import check_model_behaviour
from helpers.plots.gallery import render_gallery
from helpers.steps import (attributions, cells, confusion, data_causes, data_train, deep_dive, diagnosis, galleries,
                           model_causes, predictions, report)
from helpers.steps.context import Run, Section


def _load_missing(an: "Analysis") -> None:
    """The model, then the data (its normalisation may come from the model), where not loaded yet."""
    if an.loaded is None:
        an.load_model()
    if an.data is None:
        an.load_data()


class Analysis:
    """fastai-style entry point: `an = Analysis(params)`, then one call per notebook step."""

    def __init__(self, params: Optional[Params] = None, progress: bool = True, **overrides: Any):
        params = params or Params()
        if overrides:
            params = Params(**{**params.to_dict(), **overrides})
        params.validate()   # every value that needs neither the model nor the data; the rest in load_data()
        if params.CAM_METHOD not in CAM_METHODS:
            raise ConfigError(f"Unknown CAM_METHOD {params.CAM_METHOD!r}. Valid choices: {', '.join(CAM_METHODS)}.")
        self.params, self.progress = params, progress
        # Fails now, before any compute, when it is not writable. Under torchrun only rank 0 owns the folder.
        self.outputs = Outputs(params.OUTPUT_DIR) if distributed.is_main_process() else None
        self.device = resolve_device(params.DEVICE)
        if self.device.type == "cpu":   # the free CPUs: oversubscribed OpenMP threads stall each other
            torch.set_num_threads(default_threads())
        self.threads = torch.get_num_threads()
        self.timings: dict[str, float] = {}
        self.loaded: Optional[LoadedModel] = None; self.data: Optional[Dataset] = None   # noqa: E702
        self.inputs: Optional[torch.Tensor] = None
        self.preds: Optional[Predictions] = None
        self.cams: Optional[CamStore] = None
        self.cache: Optional[RunCache] = None
        self.results: dict[str, Section] = {}
        self._run: Optional[Run] = None
        self.model_check, self.pass_cams, self.train_pass = None, None, None   # predict(): see model/sanity.py, _pass

    # ------------------------------------------------------------------ what the notebook reads
    out = property(lambda self: self.outputs.root, doc="the output folder (OUTPUT_DIR)")

    cache_key = property(lambda self: self.cache.key if self.cache is not None else None)
    cache_hit = property(lambda self: self.cache is not None and self.cache.hit)

    @property
    def cache_stats(self) -> dict:
        stats = dict(self.cache.stats) if self.cache is not None else {}
        return {**stats, "outputs_kept": self.outputs.n_kept}

    names = property(lambda self: self.run.names, doc="the class names")

    @property
    def run(self) -> Run:
        """The context every step reads, built once per set of predictions."""
        if self.preds is None:
            raise ConfigError("No predictions yet: call predict() (or run_all()) first.")
        if self._run is None or self._run.preds is not self.preds or self._run.data is not self.data:
            cache = self.cache if self.cache is not None else RunCache(self.out, key=None)
            self._run = Run(params=self.params, data=self.data, inputs=self.inputs, model=self.loaded,
                            preds=self.preds, cams=self.cams, outputs=self.outputs, cache=cache, device=self.device,
                            progress=self.progress, pass_cams=self.pass_cams,
                            threads=self.threads if self.device.type == "cpu" else 0,
                            autocast=autocast_dtype(self.device, self.params.MIXED_PRECISION) is not None)
        return self._run

    # ------------------------------------------------------------------ 1. model and data
    def load_model(self) -> LoadedModel:
        start, p = time.perf_counter(), self.params
        classes = self.data.num_classes if self.data is not None else class_count(p.DATASET, p.DATA_ROOT)
        self.loaded = load_model(model_path=p.MODEL_PATH, arch=p.ARCH, num_classes=classes, device=str(self.device),
                                 allow_unsafe_pickle=p.ALLOW_UNSAFE_PICKLE, model_kwargs=p.MODEL_KWARGS,
                                 download=p.DOWNLOAD)
        self._timed("load_model", start)
        if self.data is not None:
            check_model_fits_data(self.loaded, tuple(self.inputs.shape[1:]), self.data.num_classes)
        return self.loaded

    def load_data(self) -> Dataset:
        start, p = time.perf_counter(), self.params
        data = load_dataset(p.DATASET, root=p.DATA_ROOT, download=p.DOWNLOAD, mean=p.MEAN, std=p.STD,
                            limit=p.LIMIT, convert_channels=p.CONVERT_CHANNELS, image_size=p.IMAGE_SIZE,
                            model=self.loaded)
        self.data = superclass_mapping(data, p.SUPERCLASS_MAP) if p.SUPERCLASS_MAP else data
        deep_dive.given_group(p, self.data)   # GROUP_CLASSES / GROUP_SIZE against the classes, before inference
        self.inputs = model_inputs(self.data.images, self.data.mean, self.data.std)   # streamed for image folders
        self._timed("load_data", start)
        if self.loaded is not None:
            check_model_fits_data(self.loaded, tuple(self.inputs.shape[1:]), self.data.num_classes)
        return self.data

    # ------------------------------------------------------------------ 2. inference (cached)
    def predict(self, cached_only: bool = False) -> Predictions:
        """One inference pass over the test set (or an identical earlier run's cached result), keeping features and
        the gallery images' activations; `cached_only=True` raises OutputError instead of running it."""
        start, p, self.train_pass = time.perf_counter(), self.params, None
        amp = autocast_dtype(self.device, p.MIXED_PRECISION)
        world = distributed.current()   # under torchrun: this process's rank; None in a single process
        if world is not None and not world.is_main:   # a worker: its shard of the pass, for rank 0; writes nothing
            if not distributed.main_decides(world, False):   # rank 0 has no cached predictions, and has loaded
                _load_missing(self)   # what rank 0 loaded before: any download into DATA_ROOT is done
                self.cams = predictions.cam_store(p, self.loaded, self.inputs, self.device)
                self.preds = self._pass(distributed.sharded(world, run_inference), amp)
            return self.preds
        self.model_check = check_model_behaviour(self.loaded, self.inputs)   # before any figure: model/sanity.py
        self.cache = RunCache(self.out, predictions.cache_key_for(p, self.loaded, self.data, self.inputs),
                              force=p.FORCE_RECOMPUTE)
        cached = predictions.read_predictions(self.cache, self.data) if cached_only or not p.FORCE_RECOMPUTE else None
        if cached is None and cached_only:
            raise OutputError(
                f"No saved predictions for this model and data in {self.cache.folder.resolve()}. Run the "
                "analysis first with the same parameters (Analysis(params).run_all() or python -m helpers "
                "analyze), or point OUTPUT_DIR at the folder that run wrote.")
        if world is not None:
            distributed.main_decides(world, cached is not None)   # the workers run their shards unless cached
        self.cams = predictions.cam_store(p, self.loaded, self.inputs, self.device)
        if cached is not None:
            self.preds, self.cache.hit = cached, True
            predictions.restore_derived(self.cache, self.cams, self.outputs)
        else:
            # Nothing else runs during the inference pass (not even the figure worker's start-up or the deep
            # dive's imports): on 2 cores any concurrent work slows it more than it saves later.
            if self.device.type == "cpu":
                torch.set_num_threads(self.threads)   # the pass gets every free core
            infer = run_inference if world is None else distributed.sharded(world, run_inference)   # + gather
            self.preds = self._pass(infer, amp)
            self.cams.pass_cams = self.pass_cams if self.pass_cams is not None and self.pass_cams.complete else None
            predictions.write_predictions(self.cache, self.preds)
        if self.device.type == "cpu":
            # Later steps run the model on a few dozen images at a time, where extra OpenMP threads mostly spin
            # while the PNG writer thread and the figure worker need the cores.
            torch.set_num_threads(max(1, self.threads // 2))
        self.outputs.writer.warm_up()   # the worker imports matplotlib while the confusion step runs
        self._timed("inference", start + (self.train_pass.seconds if self.train_pass is not None else 0.0))
        return self.preds

    def _pass(self, infer: Callable[..., Predictions], amp: Optional[torch.dtype]) -> Predictions:
        self.pass_cams = predictions.pass_cams(self.cams, len(self.inputs))   # under torchrun, gathered on rank 0
        kept_inputs = predictions.pass_inputs(self.cams, len(self.inputs), self.params.SEED)   # likewise
        observers = [o for o in (self.pass_cams, kept_inputs) if o is not None]
        with self.cams.capture(self.params.N_WORST, self.params.N_BEST) as gallery:
            preds = infer(self.loaded.module, self.inputs, self.data.labels, batch_size=self.params.BATCH_SIZE,
                          device=self.device, progress=self.progress and distributed.is_main_process(),
                          gallery=gallery, autocast_dtype=amp, observers=observers)
        self.cams.pass_inputs = kept_inputs
        self.train_pass = data_train.sharded_train_pass(self.params, self.data, self.loaded, self.device, self.progress,
                                                        self.timings)   # under torchrun: timings["train_pass"]
        return preds

    # ------------------------------------------------------------------ 3.-6. one step per section
    def confusion(self) -> confusion.Confusion:
        return self._step("confusion", confusion.confusion, self.run)

    def class_galleries(self, show: int = 3) -> galleries.ClassGalleries:
        """Best and worst predictions with CAMs for every class (one PNG per class)."""
        return self._step("class_galleries", galleries.class_galleries, self.run, self.results.get("confusion"), show)

    def class_gallery(self, cls: int, n_worst: Optional[int] = None, n_best: Optional[int] = None, **kw):
        """One class's gallery as a PIL image (not saved)."""
        return render_gallery(*galleries.class_gallery_content(self.run, cls, n_worst, n_best, **kw))

    def pair_galleries(self) -> galleries.PairGalleries:
        return self._step("pair_galleries", galleries.pair_galleries, self.run, self._needs("confusion"))

    def deep_dive(self) -> deep_dive.DeepDive:
        return self._step("deep_dive", deep_dive.run_deep_dive, self.run, self._needs("confusion"))

    def method_comparison(self, methods=None) -> attributions.MethodComparison:
        """Every fast attribution method on the group's most confident errors, true and predicted class, with
        ROAD against random maps; LIME and KernelShap (slow) only when named in `methods`."""
        return self._step("method_comparison", attributions.method_comparison, self.run, self._needs("confusion"),
                          self._needs("deep_dive"), methods)

    def data_causes(self) -> data_causes.DataCauses:
        """Is it the data? Wrong test labels, the kinds of image that go wrong, and (opt-in) the training set."""
        cpu = self.device.type == "cpu"
        if cpu and (self.params.TRAIN_EVIDENCE or self.params.TRAIN_ROOT):
            torch.set_num_threads(self.threads)   # the training pass is a second inference pass: every core
        try:
            return self._step("data_causes", data_causes.data_causes, self.run, self._needs("confusion"),
                              self.results.get("deep_dive"), self.timings.get("inference"), self.train_pass)
        finally:
            self.train_pass = None   # the training split and its features: read by this step only
            if cpu:
                torch.set_num_threads(max(1, self.threads // 2))   # as after inference: a core for the writer

    def model_causes(self) -> model_causes.ModelCauses:
        """Is it the model? Failure modes inside each pair, concepts and their share of the margin, CAM trust."""
        return self._step("model_causes", model_causes.model_causes, self.run, self._needs("confusion"),
                          self.results.get("deep_dive"), self.results.get("data_causes"))

    def diagnosis(self) -> diagnosis.Diagnosis:
        """Why these classes are confused: each top pair's causes, ranked by the share of its errors they explain."""
        return self._step("diagnosis", diagnosis.diagnosis, self.run, self._needs("confusion"),
                          self.results.get("data_causes"), self.results.get("deep_dive"),
                          self.results.get("model_causes"))

    def cell_images(self) -> cells.CellImages:
        """The images behind every confusion-matrix cell, for index.html (report() calls it when not yet run)."""
        self._needs("confusion")   # the index shows them on its confusion matrix
        return self._step("cell_images", cells.cell_images, self.run)

    def report(self) -> report.Report:
        conf = self._needs("confusion")
        cell_images = self.results.get("cell_images") or self.cell_images()
        start = time.perf_counter()
        self.outputs.flush()   # PNGs are written in the background; the index and manifest need them on disk
        sec = report.write_reports(self.run, conf, self.results.get("pair_galleries"),
                                   self.results.get("deep_dive"), self.timings, cell_images,
                                   self.results.get("data_causes"), self.results.get("diagnosis"),
                                   self.results.get("model_causes"), self.results.get("method_comparison"))
        self.results["report"] = sec
        self.save_cam_cache()
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)   # the analysis is done: give the session its threads back
        self._timed("report", start)
        return sec

    def save_cam_cache(self) -> None:
        """Write the CAMs, memoised results and gallery digests next to the outputs (report() calls it)."""
        if self.cache is not None and self.cache.key is not None and self.cams is not None:
            predictions.save_derived(self.cache, self.cams, self.outputs)

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
            self.method_comparison()
            self.data_causes()
            self.model_causes()
            self.diagnosis()
            self.report()
        except BaseException:
            self.outputs.close(raise_errors=False)   # the step's own error is the one to report
            self.outputs.abandon()                   # the folder keeps the previous complete run
            raise
        self.outputs.close()   # also stops the figure worker process
        return self.results

    # ------------------------------------------------------------------ sequencing
    def _step(self, name: str, step: Callable[..., Section], *args: Any) -> Any:
        start = time.perf_counter()
        self.results[name] = step(*args)
        self._timed(name, start)
        return self.results[name]

    def _needs(self, name: str) -> Section:
        if name not in self.results:
            raise ConfigError(f"This step needs the {name} step's results: call an.{name}() first (or run_all()).")
        return self.results[name]

    def _timed(self, name: str, start: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
