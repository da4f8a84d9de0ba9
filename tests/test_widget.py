"""The class explorer, driven in-process the way a person uses it: set a control's value, read the page."""
from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

import helpers.pipeline
from helpers.config import Params
from helpers.errors import OutputError
from helpers.pipeline import Analysis
from helpers.plots.gallery import LAYOUT
from helpers.model.layers import target_layer_choices
from helpers.widget import AUTO_LAYER, OWN_GALLERY, ClassExplorer, class_label

from conftest import run_params


def params_for(cifar_root, ckpt, out, **kw) -> Params:
    return run_params(cifar_root, ckpt, out, **kw)


@pytest.fixture(scope="module")
def saved(cifar_root, tiny_checkpoint, tmp_path_factory):
    """A run that has predicted once (its predictions are in OUTPUT_DIR/.cache)."""
    params = params_for(cifar_root, tiny_checkpoint, tmp_path_factory.mktemp("w") / "gradcam_results")
    an = Analysis(params, progress=False)
    an.load_model(); an.load_data(); an.predict()
    return an


@pytest.fixture()
def explorer(saved, monkeypatch) -> ClassExplorer:
    """A fresh explorer (its own empty CAM store) rebuilt from the saved run; inference must not run."""
    def no_inference(*a, **k):
        raise AssertionError("inference ran although the predictions are saved")
    monkeypatch.setattr(helpers.pipeline, "run_inference", no_inference)
    return ClassExplorer.from_results(saved.params)


def images_in(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(m))) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def listed(page: str) -> list[str]:
    return re.findall(r'<li class="(?:ok|err)">(.*?)</li>', page)


def confused_class(an: Analysis) -> int:
    """A class with errors: preferably spread over several other classes, then the most errors (ties: lowest id)."""
    pr, C = an.preds, an.data.num_classes
    errors = np.bincount(pr.labels[~pr.correct], minlength=C)
    spread = np.array([len(set(pr.preds[(pr.labels == c) & ~pr.correct])) for c in range(C)])
    assert errors.any()
    return int(np.lexsort((np.arange(C), -errors, -np.minimum(spread, 2)))[0])


def test_class_dropdown_lists_every_class_with_its_accuracy(explorer, saved):
    pr = saved.preds
    assert len(explorer.class_dropdown.options) == 100
    for c in (0, 42, 99):
        acc = (pr.preds[pr.labels == c] == c).mean()
        assert explorer.class_dropdown.options[c] == (f"{c:03d}: {saved.names[c]} ({acc:.1%})", c)
    assert class_label(42, "leopard", 0.67) == "042: leopard (67.0%)"


def test_selecting_a_class_shows_accuracy_wrong_predictions_and_gallery(explorer, saved):
    pr, names = saved.preds, saved.names
    c = confused_class(saved)
    n = 3
    explorer.n_slider.value = n
    explorer.class_dropdown.value = c
    page = explorer.output.value
    mask = pr.labels == c
    correct, total = int((pr.preds[mask] == c).sum()), int(mask.sum())
    assert f"({correct}/{total})" in page and f"{correct / total:.1%}" in page
    # top wrong predictions with counts, as counted directly from the predictions
    wrong, counts = np.unique(pr.preds[mask & (pr.preds != c)], return_counts=True)
    for j, k in zip(wrong, counts):
        assert f"<li>{names[j]}: {k}</li>" in page
    # the gallery: class_rows' n worst (errors first, then the least sure correct ones) and
    # round(n * N_BEST / N_WORST) best correct ones not already shown; each listed by image index
    n_err = total - correct
    n_worst = min(n, total)
    n_best = min(round(n * saved.params.N_BEST / saved.params.N_WORST), correct - max(0, n_worst - n_err))
    rows = re.findall(r'<li class="(ok|err)">#(\d+) · ', page)
    assert len(rows) == n_worst + n_best
    assert [k for k, _ in rows[:n_worst]] == ["err"] * min(n, n_err) + ["ok"] * (n_worst - min(n, n_err))
    assert all(k == "ok" for k, _ in rows[n_worst:])
    assert all(pr.labels[int(i)] == c for _, i in rows)
    assert len({i for _, i in rows}) == len(rows)
    (img,) = images_in(page)
    img.load()


def test_confused_with_lists_the_confusions_and_shows_the_pair_gallery(explorer, saved):
    pr, names = saved.preds, saved.names
    c = confused_class(saved)
    explorer.class_dropdown.value = c
    mask = (pr.labels == c) & (pr.preds != c)
    wrong, counts = np.unique(pr.preds[mask], return_counts=True)
    order = np.lexsort((wrong, -counts))
    expected = [(f"{names[j]} ({k} error{'s' if k != 1 else ''})", int(j)) for j, k in zip(wrong[order], counts[order])]
    assert list(explorer.other_dropdown.options) == [("— its own gallery —", OWN_GALLERY)] + expected
    other, count = int(wrong[order][0]), int(counts[order][0])
    store = explorer.an.cams
    explorer.n_slider.value = 12
    held, before = {k[:2] for k in store._cams}, store.n_computed
    explorer.other_dropdown.value = other
    page = explorer.output.value
    assert f"{names[c]} → {names[other]}:</b> {count} of {int((pr.labels == c).sum())} images" in page
    rows = listed(page)
    assert len(rows) == count and all(f"pred: {names[other]}" in r for r in rows)
    # a pair row is the original + CAM for the true class + CAM for the predicted class + difference: 4 tiles
    (img,) = images_in(page)
    assert img.size[0] == 2 * LAYOUT.pad + 4 * 128 + 3 * LAYOUT.gap
    # both CAMs of each example, computing only those the class view had not already computed
    idx = [int(re.match(r"#(\d+)", r).group(1)) for r in rows]
    needed = {(i, c) for i in idx} | {(i, other) for i in idx}
    assert {k[:2] for k in store._cams} == held | needed
    assert store.n_computed - before == len(needed - held)
    # changing the class resets "confused with" to the class's own gallery
    explorer.class_dropdown.value = (c + 1) % 100
    assert explorer.other_dropdown.value == OWN_GALLERY and explorer.state.other is None
    assert explorer.other_dropdown.label == "— its own gallery —"


def test_cams_are_computed_once_in_one_batch_and_cached(explorer):
    store = explorer.an.cams
    engine = store.engine()
    calls = []
    compute = engine.compute_shared   # what the store calls: every (image, class) request of a view at once
    engine.compute_shared = lambda x, rows, t, **k: calls.append(len(rows)) or compute(x, rows, t, **k)
    a, b = 3, 4
    assert explorer.state.cls not in (a, b) and explorer.state.n_examples == 5
    start = store.n_computed                                          # the initial view's CAMs
    explorer.class_dropdown.value = a
    first = store.n_computed
    assert first > start and calls == [first - start]                 # one batch for the whole view
    explorer.class_dropdown.value = b
    second = store.n_computed
    assert second > first and len(calls) == 2
    explorer.class_dropdown.value = a                                 # the same selection again
    explorer.n_slider.value = 2                                       # a smaller view of it: a new page ...
    assert store.n_computed == second and len(calls) == 2             # ... but no new CAM
    renders = explorer.n_renders
    explorer.n_slider.value = 5                                       # back to a page already built
    assert explorer.n_renders == renders and store.n_computed == second


def test_method_and_layer_changes_compute_new_cams(explorer):
    store = explorer.an.cams
    start = store.n_computed                             # the initial view's CAMs
    explorer.class_dropdown.value = 7
    base = store.n_computed - start
    explorer.method_dropdown.value = "gradcam++"
    after_method = store.n_computed
    assert after_method - start - base == base > 0       # the same (image, class) set, for the new method
    assert "gradcam++ at layer <code>features.8</code>" in explorer.status.value
    layer = explorer.layer_dropdown.options[1][1]
    explorer.layer_dropdown.value = layer
    assert store.n_computed - after_method == base
    assert f"gradcam++ at layer <code>{layer}</code>" in explorer.status.value
    assert {k[2:] for k in store._cams} == {("gradcam", "features.8"), ("gradcam++", "features.8"), ("gradcam++", layer)}
    assert len({k[:2] for k in store._cams if k[2:] == ("gradcam++", layer)}) == base
    page = explorer.select(method="gradcam", layer=None)       # both back at once: everything cached
    assert store.n_computed - after_method == base
    assert "gradcam at layer <code>features.8</code> · 0 CAMs computed" in explorer.status.value and "<img" in page


def test_method_choices_match_cam_method_and_layers_go_late_to_early(explorer, saved):
    from helpers.model.cams import CAM_METHODS
    from helpers.model.layers import resolve_target_layer
    assert list(explorer.method_dropdown.options) == list(CAM_METHODS)
    assert [v for _, v in explorer.layer_dropdown.options] == [AUTO_LAYER, "features.5", "features.2"]
    assert explorer.layer_dropdown.options[0][0] == "features.8 (automatic)"
    model = saved.loaded.module
    sizes = []
    for name in target_layer_choices(model, (3, 32, 32)):
        _, module = resolve_target_layer(model, name)
        out = []
        h = module.register_forward_hook(lambda m, i, o: out.append(o.shape[-1]))
        model(saved.inputs[:1])
        h.remove()
        sizes.append(out[0])
    assert sizes == sorted(sizes) and len(set(sizes)) == 3     # coarse (late) to fine (early), one per stage


def test_resnet56_layer_choices():
    from helpers.model.architectures import resnet56
    names = target_layer_choices(resnet56(num_classes=100), (3, 32, 32))
    assert names == ["layer3.8", "layer2.8", "layer1.8"]


def test_rebuilt_from_saved_results_reuses_predictions_and_cams(saved, monkeypatch, tmp_path):
    an = saved
    out_params = params_for(an.params.DATA_ROOT, an.params.MODEL_PATH, tmp_path / "res")
    first = Analysis(out_params, progress=False)
    first.load_model(); first.load_data(); first.predict()
    ex = ClassExplorer(first)
    ex.class_dropdown.value = 11
    page = ex.output.value
    assert first.cams.n_computed > 0
    first.save_cam_cache()                        # what report() does at the end of a run

    def no_inference(*a, **k):
        raise AssertionError("inference ran although the predictions are saved")
    monkeypatch.setattr(helpers.pipeline, "run_inference", no_inference)
    again = ClassExplorer.from_results(out_params)
    np.testing.assert_array_equal(again.an.preds.logits, first.preds.logits)
    again.class_dropdown.value = 11
    assert again.output.value == page             # the same page ...
    assert again.an.cams.n_computed == 0          # ... from CAMs loaded from the cache
    # a mapping such as the notebook's globals works too
    assert ClassExplorer.from_results({**out_params.to_dict(), "unrelated": 1}).an.cache_hit


def test_rebuilding_without_saved_results_says_how_to_get_them(saved, monkeypatch, tmp_path):
    monkeypatch.setattr(helpers.pipeline, "run_inference", lambda *a, **k: pytest.fail("inference ran"))
    params = params_for(saved.params.DATA_ROOT, saved.params.MODEL_PATH, tmp_path / "empty")
    with pytest.raises(OutputError, match="Run the analysis first"):
        ClassExplorer.from_results(params)


def test_widget_tree_is_ipywidgets_8(explorer):
    import ipywidgets
    assert int(ipywidgets.__version__.split(".")[0]) == 8
    kids = explorer.widget.children
    assert explorer.class_dropdown in kids[0].children and explorer.other_dropdown in kids[0].children
    assert explorer.method_dropdown in kids[1].children and explorer.layer_dropdown in kids[1].children
    assert explorer.n_slider in kids and explorer.output in kids
    state = explorer.widget.get_state()
    assert state["_model_module"] == "@jupyter-widgets/controls"


def test_a_class_without_test_images_says_so(saved, tmp_path):
    an = Analysis(params_for(saved.params.DATA_ROOT, saved.params.MODEL_PATH, tmp_path / "few", LIMIT=50),
                  progress=False)
    an.load_model(); an.load_data(); an.predict()
    empty = int(np.setdiff1d(np.arange(100), an.preds.labels)[0])
    ex = ClassExplorer(an)
    assert ex.class_dropdown.options[empty][0].endswith("(no test images)")
    ex.class_dropdown.value = empty
    assert "No test images of this class." in ex.output.value and "<img" not in ex.output.value
    assert list(ex.other_dropdown.options) == [("— its own gallery —", OWN_GALLERY)]


def test_default_entries_show_their_label_not_a_blank_box(explorer, saved):
    """ipywidgets shows a blank box when a dropdown's value is None: the default entries must stay selected and
    labelled, initially and after choosing another entry and then the default again."""
    own, auto = "— its own gallery —", "features.8 (automatic)"
    other, layer = explorer.other_dropdown, explorer.layer_dropdown
    c = confused_class(saved)
    explorer.class_dropdown.value = c

    def shows_defaults():
        assert (other.index, other.label) == (0, own) and (layer.index, layer.label) == (0, auto)
        assert other.get_state()["index"] == 0 and layer.get_state()["index"] == 0   # what the browser is sent
        assert explorer.state.other is None and explorer.state.layer is None
        page = explorer.output.value
        assert "<img" in page and f"{saved.names[c]} → " not in page    # the class's gallery, not a pair's
        assert "gradcam at layer <code>features.8</code>" in explorer.status.value

    shows_defaults()
    own_page = explorer.output.value
    other.index = 1                                    # a confusion ...
    assert other.label != own and explorer.state.other == other.options[1][1]
    layer.index = 1                                    # ... at another layer
    assert explorer.state.layer == layer.options[1][1] != AUTO_LAYER
    other.index, layer.index = 0, 0                    # and back to both defaults
    shows_defaults()
    assert explorer.output.value == own_page
    explorer.select(other=other.options[1][1], layer=layer.options[1][1])
    explorer.select(other=None, layer=None)            # the same through select()
    shows_defaults()

