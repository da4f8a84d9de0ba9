"""Interactive class explorer for the notebook (ipywidgets 8: JupyterLab 4 and Notebook 7).

The state lives in one small `ExplorerState`; the page is a function of that state plus the analysis, so
tests drive the widget by setting `.value` on its controls and reading the HTML it produced. CAMs come
from the analysis' CamStore: computed on demand, one batch per view, cached per (image, class, method,
layer) and saved with the run's cache, so `ClassExplorer.from_results(params)` rebuilds the explorer of
a finished run without running inference again.

The "Attribution" selector adds, for the images on screen, one pixel-attribution method's maps (Captum's
saliency, Integrated Gradients, ...; attention maps for ViTs) for the true and the predicted class, computed on
demand by helpers/model/attributions.py and cached per (image, class, method) for the explorer's lifetime.
"""
from __future__ import annotations

import html
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

import numpy as np

from helpers.compute import metrics
from helpers.errors import ConfigError, SuiteError
from helpers.files.png import png_data_uri
from helpers.model.layers import target_layer_choices
from helpers.steps.galleries import class_rows, pair_rows

if TYPE_CHECKING:
    from helpers.config import Params
    from helpers.pipeline import Analysis

MAX_EXAMPLES = 12
MAX_PAGES = 32      # rendered pages kept (each holds its gallery PNG); CAMs themselves stay in the CamStore
N_WRONG_SHOWN = 5   # top wrong predictions listed for a class
# Dropdown values of the default entries. ipywidgets reads a value of None as "nothing selected" and shows a
# blank box, so the dropdowns use these; ExplorerState keeps None.
OWN_GALLERY = -1                 # "confused with": the class's own gallery (class ids are >= 0)
AUTO_LAYER = "(automatic)"       # "target layer": the automatic one (no dotted module path has parentheses)
NO_ATTRIBUTION = "(none)"        # "attribution": no pixel-attribution panel
ATTRIBUTION_BATCH = 8            # maps per attribution call: the progress bar moves once per batch
# Above this many classes (ImageNet's 1,000) the class list starts with the weakest class and a search box
# filters it by name: a 1,000-entry dropdown in class order cannot be scrolled to the class one wants.
MANY_CLASSES = 200


def _to_widget(value: Any, sentinel: Any) -> Any:
    return sentinel if value is None else value


def _from_widget(value: Any, sentinel: Any) -> Any:
    return None if value == sentinel else value


@dataclass(frozen=True)
class ExplorerState:
    cls: int = 0
    other: Optional[int] = None      # a class `cls` is confused with; None = the class's own gallery
    method: str = "gradcam"
    layer: Optional[str] = None      # None = the automatic target layer
    n_examples: int = 5
    attribution: Optional[str] = None   # a helpers.model.attributions method; None = no attribution panel


def class_label(cls: int, name: str, accuracy: float) -> str:
    """Dropdown text, e.g. '042: leopard (67.0%)'."""
    return f"{cls:03d}: {name} ({accuracy:.1%})" if np.isfinite(accuracy) else f"{cls:03d}: {name} (no test images)"


def classes_weakest_first(accuracy: np.ndarray) -> list[int]:
    """Class ids by accuracy (ascending, ties by id), classes without test images last."""
    acc = np.where(np.isfinite(accuracy), accuracy, np.inf)
    return [int(c) for c in np.lexsort((np.arange(len(acc)), acc))]


def matching_classes(names, order: list[int], text: str) -> list[int]:
    """The classes of `order` whose name contains `text` (case-insensitive), in that order; all for no text."""
    q = text.strip().lower()
    return [c for c in order if q in str(names[c]).lower()] if q else list(order)


def confusions_of(cm: np.ndarray, cls: int) -> list[tuple[int, int]]:
    """(predicted class, count) for every wrong prediction of `cls`, most frequent first (ties by id)."""
    row = np.asarray(cm[cls]).copy()
    row[cls] = 0
    return [(int(j), int(row[j])) for j in np.argsort(-row, kind="stable") if row[j] > 0]


def attribution_panel(an: "Analysis", method: str, shown: list[int], maps: list[np.ndarray]) -> str:
    """The images on screen with `method`'s map for their true class (the first half of `maps`) and their
    predicted class (the second half)."""
    import base64
    import io

    import matplotlib.pyplot as plt
    from helpers.model.attributions import ATTRIBUTION_METHODS
    from helpers.plots.attributions import MethodMaps, plot_method_comparison
    spec = ATTRIBUTION_METHODS[method]
    n = len(shown)
    fig = plot_method_comparison([an.data.images[i] for i in shown], [an.run.conf_title(i) for i in shown],
                                 [MethodMaps(method, np.stack(maps[:n]), np.stack(maps[n:]),
                                             signed=spec.aggregation == "sum")],
                                 title=f"{method} ({spec.library})")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)   # shown as an <img>: a figure left open would also be drawn below the widget
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<p><b>Attribution: {html.escape(method)}</b> — for the true and the predicted class of every '
            f'image above. {html.escape(spec.note)}.</p>'
            f'<img class="attribution" src="{uri}" style="max-width:100%">')


def diagnosis_html(an: "Analysis", cls: int, other: int) -> str:
    """The pair's diagnosis (when the diagnosis step ran), ranked causes with their numbers."""
    from helpers.steps.diagnosis import pair_sentence
    diag = an.results.get("diagnosis")
    d = diag.of(cls, other) if diag is not None else None
    if d is None:
        return ("" if diag is None else
                "<p><b>Why:</b> this pair was not diagnosed (it is not among the top confused pairs).</p>")
    return f'<p class="diagnosis"><b>Why:</b> {html.escape(pair_sentence(d))}</p>'


class ClassPicker:
    """The class dropdown (values: class ids); for more than MANY_CLASSES classes listed weakest first, with a
    search box that narrows it to the names containing its text. `quiet` is True while it changes the dropdown
    itself, so that its owner ignores those changes."""

    def __init__(self, names, accuracy: np.ndarray, value: int, wide: dict):
        import ipywidgets as w
        many = len(names) > MANY_CLASSES
        self.names, self.accuracy, self.quiet = names, accuracy, False
        self.order = classes_weakest_first(accuracy) if many else list(range(len(names)))
        self.dropdown = w.Dropdown(options=self.options(self.order), value=value,
                                   description="Class (weakest first):" if many else "Class:", **wide)
        self.search = (w.Text(placeholder="part of a class name", description="Find class:",
                              continuous_update=False, **wide) if many else None)

    def options(self, ids: list[int]) -> list[tuple[str, int]]:
        return [(class_label(c, self.names[c], self.accuracy[c]), c) for c in ids]

    def show(self, ids: list[int], keep: int) -> None:
        """List the classes `ids`, selecting `keep` (one of them)."""
        self.quiet = True
        try:
            self.dropdown.options = self.options(ids)
            self.dropdown.value = keep
        finally:
            self.quiet = False

    def narrow(self, text: str) -> list[int]:
        """List the classes whose name contains `text` (none: every class), keeping the current one when it is
        among them, else selecting the first. Nothing changes when no name matches. Returns the classes listed."""
        ids = matching_classes(self.names, self.order, text)
        if ids:
            current = self.dropdown.value
            self.show(ids, current if current in ids else ids[0])
        return ids

    def find(self, text: str, status, changed) -> list[int]:
        """narrow(text); when no name matches, say so in `status` (an HTML widget); when another class is now
        selected, call changed(). Returns the classes listed."""
        current, ids = self.dropdown.value, self.narrow(text)
        if not ids:
            status.value = f"<small>No class name contains {html.escape(repr(text))}.</small>"
        elif self.dropdown.value != current:
            changed()
        return ids

    def watch(self, find) -> None:
        """Call find(text) when the search box's text changes (not when the picker clears it itself)."""
        if self.search is not None:
            self.search.observe(lambda change: None if self.quiet else find(change["new"]), names="value")

    def reveal(self, cls: int) -> None:
        """Make `cls` selectable: when the search left it out, clear the search and list every class again."""
        if self.search is not None and all(v != cls for _, v in self.dropdown.options):
            self.quiet = True
            try:
                self.search.value = ""
            finally:
                self.quiet = False
            self.show(self.order, cls)


class ClassExplorer:
    """Class dropdown, 'confused with' dropdown, CAM method, target layer and number of examples.

    `n_renders` counts pages built; the analysis' `cams.n_computed` counts CAMs computed. Both are what
    the tests watch to prove that a repeated selection is served from the caches."""

    def __init__(self, analysis: "Analysis", layers: Optional[list[str]] = None):
        import ipywidgets as w
        from helpers.model.attributions import ATTRIBUTION_METHODS, methods_for
        from helpers.model.cams import CAM_METHODS

        if analysis.preds is None:
            raise ConfigError("The explorer needs predictions: call predict() (or run_all()) first, or rebuild "
                             "it from a finished run with ClassExplorer.from_results(params).")
        self.an = analysis
        pr, names = analysis.preds, analysis.names
        self.cm = metrics.confusion_matrix(pr.labels, pr.preds, analysis.data.num_classes)
        support = self.cm.sum(axis=1)
        self.accuracy = np.divide(np.diag(self.cm), support, out=np.full(len(support), np.nan), where=support > 0)
        p = analysis.params
        run_layer = analysis.cams.engine().layer_name   # the layer this run's CAMs used
        if layers is None:
            layers = target_layer_choices(analysis.loaded.module, tuple(analysis.inputs.shape[1:]))
        # The first option is the run's own layer (TARGET_LAYER or automatic), so its cached CAMs are reused.
        layer_options = [(f"{run_layer} ({'TARGET_LAYER' if p.TARGET_LAYER else 'automatic'})",
                          _to_widget(p.TARGET_LAYER, AUTO_LAYER))]
        layer_options += [(name, name) for name in layers if name != run_layer]
        self.state = ExplorerState(cls=int(np.nanargmin(np.where(support > 0, self.accuracy, np.inf)))
                                   if support.any() else 0,
                                   method=p.CAM_METHOD, layer=p.TARGET_LAYER,
                                   n_examples=min(MAX_EXAMPLES, max(1, p.N_WORST)))
        self._rendered: OrderedDict[ExplorerState, str] = OrderedDict()
        self.n_renders = 0
        self._syncing = False
        self._attributions: dict[tuple[int, int, str], np.ndarray] = {}   # (image, class, method) -> map
        self.n_attributions = 0   # attribution maps computed (the tests watch it to prove the cache serves)

        wide = dict(layout=w.Layout(width="380px"), style={"description_width": "110px"})
        self.picker = ClassPicker(names, self.accuracy, self.state.cls, wide)
        self.class_dropdown, self.class_search = self.picker.dropdown, self.picker.search
        self.other_dropdown = w.Dropdown(description="Confused with:", **wide)
        self.method_dropdown = w.Dropdown(options=list(CAM_METHODS), value=self.state.method,
                                          description="CAM method:", **wide)
        attr_options = [(NO_ATTRIBUTION, NO_ATTRIBUTION)] + [
            (f"{m} (slow)" if ATTRIBUTION_METHODS[m].cost == "slow" else m, m)
            for m in methods_for(analysis.loaded.module, include_slow=True)]
        self.attribution_dropdown = w.Dropdown(options=attr_options, value=NO_ATTRIBUTION,
                                               description="Attribution:", **wide)
        self.attribution_progress = w.IntProgress(value=0, min=0, max=1, description="Attribution:",
                                                  layout=w.Layout(width="380px", visibility="hidden"))
        self.layer_dropdown = w.Dropdown(options=layer_options, value=_to_widget(self.state.layer, AUTO_LAYER),
                                         description="Target layer:", **wide)
        self.n_slider = w.IntSlider(value=self.state.n_examples, min=1, max=MAX_EXAMPLES,
                                    description="Examples:", continuous_update=False, **wide)
        self.status, self.output = w.HTML(), w.HTML()
        self._set_other_options()
        for control in self.controls:
            control.observe(self._on_change, names="value")
        self.picker.watch(self.find_class)
        self.widget = w.VBox([
            w.HBox([c for c in (self.class_search, self.class_dropdown, self.other_dropdown) if c is not None]),
            w.HBox([self.method_dropdown, self.attribution_dropdown, self.layer_dropdown]),
            self.n_slider, self.attribution_progress, self.status, self.output,
        ])
        self.refresh()

    @classmethod
    def from_results(cls, params: Union["Params", Mapping[str, Any], None] = None, progress: bool = False,
                     **overrides: Any) -> "ClassExplorer":
        """The explorer of a finished run, rebuilt without running inference: the model and the test images
        are loaded (cheap), the predictions and the CAMs come from OUTPUT_DIR/.cache. `params` are the run's
        parameters (a Params, or a mapping such as the notebook's globals); OutputError when that run's
        results are not there."""
        from helpers.config import Params
        from helpers.pipeline import Analysis
        if params is not None and not isinstance(params, Params):
            params = Params.from_mapping(params)
        an = Analysis(params, progress=progress, **overrides)
        an.load_model()
        an.load_data()
        an.predict(cached_only=True)
        return cls(an)

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget)

    @property
    def controls(self) -> list:
        return [self.class_dropdown, self.other_dropdown, self.method_dropdown, self.layer_dropdown, self.n_slider,
                self.attribution_dropdown]

    # ------------------------------------------------------------------ state <-> widgets
    def find_class(self, text: str) -> list[int]:
        """ClassPicker.find, then the page of the class it selects (as a choice in the dropdown would)."""
        return self.picker.find(text, self.status, lambda: self._on_change({"owner": self.class_dropdown}))

    def _set_other_options(self) -> None:
        cls = self.class_dropdown.value
        options = [("— its own gallery —", OWN_GALLERY)]
        options += [(f"{self.an.names[j]} ({n} error{'s' if n != 1 else ''})", j) for j, n in confusions_of(self.cm, cls)]
        was, self._syncing = self._syncing, True
        try:
            self.other_dropdown.options = options
            self.other_dropdown.value = OWN_GALLERY
        finally:
            self._syncing = was

    def _on_change(self, change) -> None:
        if self._syncing or self.picker.quiet:
            return
        if change["owner"] is self.class_dropdown:
            self._set_other_options()
        self.refresh()

    def refresh(self) -> None:
        self.state = ExplorerState(cls=self.class_dropdown.value,
                                   other=_from_widget(self.other_dropdown.value, OWN_GALLERY),
                                   method=self.method_dropdown.value,
                                   layer=_from_widget(self.layer_dropdown.value, AUTO_LAYER),
                                   n_examples=self.n_slider.value,
                                   attribution=_from_widget(self.attribution_dropdown.value, NO_ATTRIBUTION))
        store = self.an.cams
        before = store.n_computed
        if self.state not in self._rendered:
            self.status.value = ("<i>Computing CAMs and attributions…</i>" if self.state.attribution
                                 else "<i>Computing CAMs…</i>")
        try:
            page = self.render(self.state)
        except SuiteError as exc:   # e.g. a layer this method cannot use: say so in place of the page
            page = f'<p style="color:#b00"><b>Cannot show this view:</b> {html.escape(str(exc))}</p>'
        self.output.value = page
        try:
            layer_name = store.engine(self.state.method, self.state.layer).layer_name
        except SuiteError:
            layer_name = str(self.state.layer)
        self.status.value = (f"<small>{html.escape(self.state.method)} at layer <code>{html.escape(layer_name)}</code>"
                             f" · {store.n_computed - before} CAMs computed for this view, {len(store)} cached</small>")

    # ------------------------------------------------------------------ rendering
    def render(self, s: ExplorerState) -> str:
        if s not in self._rendered:
            self._rendered[s] = self._render(s)
            self.n_renders += 1
            while len(self._rendered) > MAX_PAGES:
                self._rendered.popitem(last=False)
        self._rendered.move_to_end(s)
        return self._rendered[s]

    def _render(self, s: ExplorerState) -> str:
        from helpers.plots.gallery import render_gallery
        an, names = self.an, self.an.names
        support, correct = int(self.cm[s.cls].sum()), int(self.cm[s.cls, s.cls])
        wrong = confusions_of(self.cm, s.cls)
        parts = [f"<h3>{s.cls:03d}: {html.escape(names[s.cls])}</h3>"]
        if not support:
            return "".join(parts) + "<p>No test images of this class.</p>"
        parts.append(f"<p><b>Accuracy:</b> {self.accuracy[s.cls]:.1%} ({correct}/{support})</p>")
        if wrong:
            items = "".join(f"<li>{html.escape(names[j])}: {n}</li>" for j, n in wrong[:N_WRONG_SHOWN])
            parts.append(f'<p><b>Top wrong predictions:</b></p><ul class="wrong">{items}</ul>')
        else:
            parts.append("<p>No wrong predictions.</p>")
        kw = dict(method=s.method, layer=s.layer)
        if s.other is None:
            n_worst = s.n_examples
            n_best = max(1, round(n_worst * an.params.N_BEST / max(1, an.params.N_WORST)))
            worst_rows, best_rows = class_rows(an.run, s.cls, n_worst, n_best, **kw)
            worst, best = metrics.gallery_examples(an.preds.labels, an.preds.preds, an.preds.probs, s.cls,
                                                   n_worst, n_best)   # the images class_rows shows
            sections = [(f"{len(worst_rows)} worst predictions", worst_rows),
                        (f"{len(best_rows)} best predictions", best_rows)]
            sections = [sec for sec in sections if sec[1]]
            title = f"Class {s.cls:03d}: {names[s.cls]} — accuracy {self.accuracy[s.cls]:.1%} ({s.method})"
        else:
            pr = an.preds
            idx = metrics.pair_examples(pr.labels, pr.preds, pr.probs, s.cls, s.other, s.n_examples)
            # both CAMs of every example in one batch; pair_rows then reads them from the store
            an.cams.prefetch([(int(i), s.cls) for i in idx] + [(int(i), s.other) for i in idx], **kw)
            _, rows, *_ = pair_rows(an.run, s.cls, s.other, s.n_examples, **kw)
            n = int(self.cm[s.cls, s.other])
            parts.append(f"<p><b>{html.escape(names[s.cls])} → {html.escape(names[s.other])}:</b> {n} of "
                         f"{support} images ({n / max(support, 1):.1%}); the {len(rows)} most confident shown: "
                         "original, CAM for the true class, CAM for the predicted class, their difference.</p>")
            sections = [(f"{len(rows)} most confident {names[s.cls]} → {names[s.other]} errors", rows)]
            title = f"{names[s.cls]} → {names[s.other]}: {n} errors ({s.method})"
        if not any(rows for _, rows in sections):
            parts.append("<p>No examples to show.</p>")
            return "".join(parts)
        img = render_gallery(title, sections)
        parts.append(f'<img class="gallery" src="{png_data_uri(img)}" style="max-width:100%">')
        if s.other is not None:
            parts.append(diagnosis_html(an, s.cls, s.other))
        if s.attribution:
            shown = (list(worst) + list(best)) if s.other is None else [int(i) for i in idx]
            if shown:
                pr = an.preds
                maps = self.attribution_maps(s.attribution, [(i, int(pr.labels[i])) for i in shown]
                                             + [(i, int(pr.preds[i])) for i in shown])
                parts.append(attribution_panel(an, s.attribution, shown, maps))
        listed = "".join(f'<li class="{"ok" if r.ok else "err"}">{html.escape(r.title)}</li>'
                         for _, rows in sections for r in rows)
        parts.append(f'<details><summary>Images shown</summary><ol class="examples">{listed}</ol></details>')
        return "".join(parts)

    # ------------------------------------------------------------------ attributions
    def attribution_maps(self, method: str, pairs: list[tuple[int, int]]) -> list[np.ndarray]:
        """The maps of `method` for (image, class) pairs: the cached ones as they are, the rest computed in
        batches of ATTRIBUTION_BATCH with the progress bar showing, then cached per (image, class, method)."""
        from helpers.model.attributions import attribute
        an = self.an
        todo = list(dict.fromkeys(p for p in pairs if (p[0], p[1], method) not in self._attributions))
        bar = self.attribution_progress
        if todo:
            bar.max, bar.value, bar.description = len(todo), 0, f"{method}:"
            bar.layout.visibility = "visible"
            try:
                for s in range(0, len(todo), ATTRIBUTION_BATCH):
                    chunk = todo[s:s + ATTRIBUTION_BATCH]
                    maps = attribute(an.loaded.module, an.inputs[[i for i, _ in chunk]], [c for _, c in chunk],
                                     method, mean=an.data.mean, std=an.data.std, seed=an.params.SEED)
                    for (i, c), m in zip(chunk, maps):
                        self._attributions[(i, c, method)] = m
                    self.n_attributions += len(chunk)
                    bar.value = s + len(chunk)
            finally:
                bar.layout.visibility = "hidden"
        return [self._attributions[(i, c, method)] for i, c in pairs]

    def select(self, **changes: Any) -> str:
        """Set several controls at once (cls=, other=, method=, layer=, n_examples=, attribution=) and return the page;
        the same as choosing them in the widget, with one refresh instead of one per control."""
        target = replace(self.state, **changes)
        self._syncing = True
        try:
            if target.cls != self.class_dropdown.value:
                self.picker.reveal(target.cls)
                self.class_dropdown.value = target.cls
                self._set_other_options()
            self.other_dropdown.value = _to_widget(target.other, OWN_GALLERY)
            self.method_dropdown.value = target.method
            self.layer_dropdown.value = _to_widget(target.layer, AUTO_LAYER)
            self.n_slider.value = target.n_examples
            self.attribution_dropdown.value = _to_widget(target.attribution, NO_ATTRIBUTION)
        finally:
            self._syncing = False
        self.refresh()
        return self.output.value
