"""What every step reads: the `Run` context, built once after inference, and `Section`, the base of the typed
results the steps return.

A step is a function `step(run, <upstream results>) -> <its Section subclass>`: it computes with compute/,
draws with plots/, saves through `run.outputs`, and returns its numbers as typed fields. Nothing downstream
writes into an upstream result.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from helpers.config import Params
from helpers.data.datasets import Dataset, safe_filename
from helpers.files.cache import RunCache
from helpers.files.outputs import Outputs
from helpers.files.png import inline_image
from helpers.model.cam_store import CamStore
from helpers.model.inference import Predictions
from helpers.model.load import LoadedModel
from helpers.model.pass_cams import PassCams
from helpers.plots.overlay import overlay_many

_DISPLAY_FIELDS = ("title", "figures", "files", "notes")


@dataclass(kw_only=True)
class Section:
    """What one step produced: figures to show inline, the files it wrote, notes, and (in subclasses) its
    numbers as typed fields."""
    title: str
    figures: dict = field(default_factory=dict)    # name -> matplotlib Figure or PIL.Image
    files: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def values(self) -> dict[str, Any]:
        """The step's numbers by field name, for the notebook (`conf.values["pairs"]`); what was not
        measured (None) is absent."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in _DISPLAY_FIELDS and getattr(self, f.name) is not None}

    def show(self, names: Optional[list[str]] = None) -> None:
        for note in self.notes:
            print(note)
        for name, fig in self.figures.items():
            if names is None or name in names:
                show_inline(fig)


def show_inline(fig) -> None:
    """Display a figure or PIL image in the notebook as one inline-sized JPEG or PNG (files.png.inline_image):
    displayed directly, a figure is a full-resolution PNG and a PIL image both a PNG and a JPEG, which autosave
    keeps in the .ipynb (megabytes per run)."""
    from IPython.display import Image, display
    data, fmt = inline_image(fig)
    display(Image(data=data, format=fmt))


LARGE_PIXELS = 64 * 64


def large_inputs(inputs) -> bool:
    h, w = inputs.shape[-2:]
    return int(h) * int(w) > LARGE_PIXELS


@dataclass
class Run:
    """One analysis run, read by every step: parameters, data, model, predictions, the CAM store, the outputs
    and the cache. Built once, after inference; the steps only read it (the store and outputs record what
    they computed and wrote)."""
    params: Params
    data: Dataset
    inputs: torch.Tensor
    model: Optional[LoadedModel]
    preds: Predictions
    cams: Optional[CamStore]
    outputs: Outputs
    cache: RunCache
    device: torch.device
    progress: bool = True
    autocast: bool = False   # the inference pass ran under float16 autocast (MIXED_PRECISION on CUDA)
    pass_cams: Optional[PassCams] = None   # every image's true/pred Grad-CAM from the inference pass (fast path)
    threads: int = 0   # CPU: the inference pass's torch threads (later steps run on half of them); 0 = leave as is
    names: list[str] = field(init=False)   # display names of the classes, built once

    def __post_init__(self) -> None:
        self.names = self.data.display_names

    @property
    def large_images(self) -> bool:
        """Images above LARGE_PIXELS (64x64): every model pass costs ~50x a CIFAR one, so the checks that run many
        passes per image (occlusion, CAM trust) take fewer images (issue 18: the analysis near one pass)."""
        return large_inputs(self.inputs)

    @property
    def costly_cams(self) -> bool:
        """Large images whose CAMs each cost a model pass (not the fast GAP→Linear path, whose true/pred maps come
        from the inference pass): the bulk CAM statistics take a smaller sample. From the engine, not from this
        run's pass, so an identical re-run that reads everything from the cache samples the same images."""
        return self.large_images and self.cams is not None and not self.cams.engine().fast

    @contextlib.contextmanager
    def model_threads(self) -> Iterator[None]:
        """Every thread of the pass for a step's batch of model passes (concept activations, ROAD's imputed copies,
        randomised copies): at half the threads, 120 concept images at 224 px took 7.3 s on ResNet-18."""
        before = torch.get_num_threads()
        if self.threads > before:
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def overlays(self, indices: Sequence[int], cams: Sequence[np.ndarray]) -> list[np.ndarray]:
        """CAMs drawn over their images, in one vectorised pass."""
        return list(overlay_many([self.data.images[i] for i in indices], cams)) if len(indices) else []

    def conf_title(self, idx: int) -> str:
        p, names = self.preds, self.names
        t, q = int(p.labels[idx]), int(p.preds[idx])
        if t == q:
            return f"#{idx} · {names[t]} ({p.probs[idx, q]:.2f})"
        return f"#{idx} · true: {names[t]} ({p.probs[idx, t]:.2f}) · pred: {names[q]} ({p.probs[idx, q]:.2f})"

    def class_slug(self, cls: int) -> str:
        """'003_maple_tree': the part of every per-class or per-pair file name that names a class. The id keeps
        the files of one run apart whatever the names (non-Latin scripts, names that differ only in
        punctuation); safe_filename keeps the name readable."""
        return f"{cls:03d}_{safe_filename(self.data.class_names[cls])}"

    def gallery_filename(self, cls: int) -> str:
        return f"class_{self.class_slug(cls)}.png"
