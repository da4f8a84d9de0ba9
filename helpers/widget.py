"""Interactive class explorer for the notebook (ipywidgets 8).

The state lives in one small `ExplorerState`; the rendering is a pure function of that state plus
the analysis, so tests drive it by setting widget values and reading the HTML it produced.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np

from . import metrics

if TYPE_CHECKING:
    from .pipeline import Analysis

MAX_EXAMPLES = 12


@dataclass
class ExplorerState:
    cls: int = 0
    other: Optional[int] = None      # a class `cls` is confused with; None = the class's own gallery
    method: str = "gradcam"
    layer: Optional[str] = None      # None = the automatic target layer
    n_examples: int = 5


def png_data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def class_label(cls: int, name: str, accuracy: float) -> str:
    """Dropdown text, e.g. '042: leopard (67.0%)'."""
    return f"{cls:03d}: {name} ({accuracy:.1%})"


class ClassExplorer:
    def __init__(self, analysis: "Analysis", layers: Optional[list[str]] = None):
        import ipywidgets as w
        from .cams import CAM_METHODS

        self.an = analysis
        pr = analysis.preds
        names = analysis.names
        self.cm = metrics.confusion_matrix(pr.labels, pr.preds, analysis.data.num_classes)
        support = self.cm.sum(axis=1)
        self.accuracy = np.divide(np.diag(self.cm), support, out=np.full(len(support), np.nan), where=support > 0)
        self.state = ExplorerState(method=analysis.params.CAM_METHOD, layer=analysis.params.TARGET_LAYER,
                                   n_examples=max(1, analysis.params.N_WORST))
        self._rendered: dict[tuple, str] = {}
        self.n_renders = 0

        self.class_dropdown = w.Dropdown(
            options=[(class_label(c, names[c], self.accuracy[c]), c) for c in range(len(names))],
            value=0, description="Class:", layout=w.Layout(width="360px"))
        self.other_dropdown = w.Dropdown(description="Confused with:", layout=w.Layout(width="360px"),
                                         style={"description_width": "initial"})
        self.method_dropdown = w.Dropdown(options=list(CAM_METHODS), value=self.state.method, description="CAM:")
        layer_options = [("automatic", None)] + [(name, name) for name in (layers or [])]
        self.layer_dropdown = w.Dropdown(options=layer_options, value=None, description="Layer:")
        self.n_slider = w.IntSlider(value=self.state.n_examples, min=1, max=MAX_EXAMPLES, description="Examples:")
        self.output = w.HTML()
        self._set_other_options()
        for widget in (self.class_dropdown, self.other_dropdown, self.method_dropdown,
                       self.layer_dropdown, self.n_slider):
            widget.observe(self._on_change, names="value")
        self.widget = w.VBox([
            w.HBox([self.class_dropdown, self.other_dropdown]),
            w.HBox([self.method_dropdown, self.layer_dropdown, self.n_slider]),
            self.output,
        ])
        self.refresh()

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget)

    # ------------------------------------------------------------------ state <-> widgets
    def _set_other_options(self) -> None:
        cls = self.class_dropdown.value
        row = self.cm[cls].copy()
        row[cls] = 0
        order = [int(j) for j in np.argsort(-row, kind="stable") if row[j] > 0]
        options = [("— its own gallery —", None)] + [(f"{self.an.names[j]} ({row[j]})", j) for j in order]
        self._syncing = True
        self.other_dropdown.options = options
        self.other_dropdown.value = None
        self._syncing = False

    def _on_change(self, change) -> None:
        if getattr(self, "_syncing", False):
            return
        if change["owner"] is self.class_dropdown:
            self._set_other_options()
        self.refresh()

    def refresh(self) -> None:
        self.state = ExplorerState(cls=self.class_dropdown.value, other=self.other_dropdown.value,
                                   method=self.method_dropdown.value, layer=self.layer_dropdown.value,
                                   n_examples=self.n_slider.value)
        self.output.value = self.render(self.state)

    # ------------------------------------------------------------------ rendering
    def render(self, s: ExplorerState) -> str:
        key = (s.cls, s.other, s.method, s.layer, s.n_examples)
        if key not in self._rendered:
            self._rendered[key] = self._render(s)
            self.n_renders += 1
        return self._rendered[key]

    def _render(self, s: ExplorerState) -> str:
        from .plots import render_gallery
        an, names = self.an, self.an.names
        support = int(self.cm[s.cls].sum())
        correct = int(self.cm[s.cls, s.cls])
        row = self.cm[s.cls].copy()
        row[s.cls] = 0
        wrong = [(int(j), int(row[j])) for j in np.argsort(-row, kind="stable")[:5] if row[j] > 0]
        parts = [f"<h3>{s.cls:03d}: {html.escape(names[s.cls])}</h3>",
                 f"<p><b>Accuracy:</b> {self.accuracy[s.cls]:.1%} ({correct}/{support})</p>"]
        if wrong:
            items = "".join(f"<li>{html.escape(names[j])}: {n}</li>" for j, n in wrong)
            parts.append(f"<p><b>Top wrong predictions:</b></p><ul>{items}</ul>")
        else:
            parts.append("<p>No wrong predictions.</p>")
        if s.other is None:
            n_best = max(1, round(s.n_examples * an.params.N_BEST / max(1, an.params.N_WORST)))
            img = an.class_gallery(s.cls, n_worst=s.n_examples, n_best=n_best, method=s.method, layer=s.layer)
        else:
            _, rows, *_ = an.pair_rows(s.cls, s.other, s.n_examples, method=s.method, layer=s.layer)
            img = render_gallery(f"{names[s.cls]} → {names[s.other]}: {int(self.cm[s.cls, s.other])} errors "
                                 f"({s.method})", [("most confident errors", rows)])
        parts.append(f'<img src="{png_data_uri(img)}" style="max-width:100%">')
        return "".join(parts)
