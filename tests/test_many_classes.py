"""A 1,000-class image folder end to end: the run finishes, writes the galleries of the CLASS_GALLERIES weakest
classes (not 1,000), readable confusion PNGs (top N named, groups named, the whole matrix by group), an index.html
that Chromium draws in seconds, and a widget whose class list is searchable."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_params
from helpers.config import Params, class_gallery_count
from helpers.errors import ConfigError
from helpers.pipeline import Analysis
from helpers.steps.confusion import TOP_CLASSES, weakest_classes

TINY = "tests/tiny_model.py:TinyNet"
N_CLASSES = 1000
GALLERIES = 20


def tiny_checkpoint(path, num_classes: int):
    from tiny_model import TinyNet
    torch.manual_seed(0)
    torch.save(TinyNet(num_classes=num_classes, width=8).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def thousand(tmp_path_factory):
    from helpers.data.synthetic import write_fake_imagefolder
    work = tmp_path_factory.mktemp("many")
    root = write_fake_imagefolder(work / "data", classes=[f"n{i:08d}" for i in range(N_CLASSES)], n_per_class=2,
                                  size=16)
    params = run_params(root, tiny_checkpoint(work / "tiny.pt", N_CLASSES), work / "out", arch=TINY,
                        DATASET="imagefolder", MODEL_KWARGS={"num_classes": N_CLASSES, "width": 8},
                        EMBEDDING="tsne", CLASS_GALLERIES=GALLERIES)
    an = Analysis(params, progress=False)
    start = time.perf_counter()
    an.run_all()
    print(f"1,000-class run: {time.perf_counter() - start:.1f} s; steps {an.timings}")
    return an


def test_class_galleries_of_the_weakest_classes_only(thousand):
    files = sorted(p.name for p in (thousand.out / "worst_predictions").glob("class_*.png"))
    assert len(files) == GALLERIES
    expected = sorted(int(c) for c in weakest_classes(thousand.results["confusion"].cm)[:GALLERIES])
    assert [int(f.split("_")[1]) for f in files] == expected
    assert any("20 weakest of 1000 classes" in n for n in thousand.results["class_galleries"].notes)


def test_weakest_classes_by_hand():
    cm = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 2]])   # accuracies 75%, no images, 50%
    assert weakest_classes(cm).tolist() == [2, 0, 1]
    cm = np.array([[0, 2, 0], [1, 0, 0], [0, 0, 5]])   # two at 0%: the one with more errors first
    assert weakest_classes(cm).tolist() == [0, 1, 2]


def test_confusion_pngs_are_bounded_and_named_by_at_most_n(thousand):
    out = thousand.out
    for name in ("confusion_matrix_full.png", "confusion_matrix_top.png", "confusion_matrix_groups.png"):
        with Image.open(out / name) as im:
            assert 500 <= im.width <= 3000 and 500 <= im.height <= 3000, (name, im.size)
    conf = thousand.results["confusion"]
    groups = conf.figures["confusion_groups"].axes[0]
    n_groups = len(set(conf.groups.tolist()))
    assert conf.group_kind == "cluster" and len(groups.get_xticklabels()) == n_groups == round(N_CLASSES ** 0.5)
    # the groups' matrix is the confusion summed over each cluster's classes (sklearn on the group labels)
    from sklearn.metrics import confusion_matrix
    pr = thousand.preds
    seen = {}
    for c in conf.order:
        seen.setdefault(int(conf.groups[c]), len(seen))
    along = np.array([seen[int(g)] for g in conf.groups])
    expected = confusion_matrix(along[pr.labels], along[pr.preds], labels=range(n_groups))
    image = groups.get_images()[0].get_array()
    pct = 100 * expected / np.maximum(expected.sum(1, keepdims=True), 1)
    np.testing.assert_allclose(np.asarray(image), pct)
    assert thousand.results["confusion"].heatmap is None   # no 1,000 x 1,000 Plotly heatmap is built
    html = (out / "confusion_matrix_interactive.html").read_text(encoding="utf-8")
    assert len(html) < 2_000_000 and 'src="plotly.min.js"' in html


def test_index_html_is_bounded_and_draws_in_seconds(thousand):
    from browser import CHROMIUM, browser_page
    index = thousand.out / "index.html"
    size = index.stat().st_size
    print(f"index.html {size / 1e6:.2f} MB")
    assert size < 20_000_000
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing")
    with browser_page(width=1400, height=1000) as (page, problems):
        start = time.perf_counter()
        page.goto(index.as_uri(), wait_until="commit")
        page.wait_for_selector("#confusion-matrix .main-svg", timeout=60_000)
        took = time.perf_counter() - start
        print(f"index.html first figure after {took:.1f} s")
        assert took < 15   # a few seconds; generous for a loaded test machine
        assert page.evaluate("() => window.cmView.ids.length") == 50
        assert problems == []


def test_widget_lists_weakest_first_and_searches(thousand):
    from helpers.widget import ClassExplorer
    ex = ClassExplorer(thousand)
    values = [v for _, v in ex.class_dropdown.options]
    assert sorted(values) == list(range(N_CLASSES))
    acc = ex.accuracy[values]
    assert np.all(np.diff(acc[np.isfinite(acc)]) >= 0) and not np.isfinite(acc[np.isfinite(acc).sum():]).any()
    ids = ex.find_class("n0000042")   # n00000420 ... n00000429 (n00000042 does not contain it)
    assert sorted(ids) == list(range(420, 430))
    assert ex.class_dropdown.value in ids and f"{ex.class_dropdown.value:03d}" in ex.output.value
    ex.select(cls=7)   # outside the filter: the list is restored
    assert ex.class_dropdown.value == 7 and len(ex.class_dropdown.options) == N_CLASSES


def test_class_galleries_all_on_a_small_label_set(tmp_path):
    from helpers.data.synthetic import write_fake_imagefolder
    root = write_fake_imagefolder(tmp_path / "data", classes=12, n_per_class=3, size=16)
    params = run_params(root, tiny_checkpoint(tmp_path / "t.pt", 12), tmp_path / "out", arch=TINY,
                        DATASET="imagefolder", MODEL_KWARGS={"num_classes": 12, "width": 8}, CLASS_GALLERIES="all")
    an = Analysis(params, progress=False)
    an.load_model(), an.load_data(), an.predict(), an.confusion(), an.class_galleries()
    assert len(an.results["class_galleries"].files) == 12


def test_class_galleries_parameter():
    assert class_gallery_count("all", 1000) == 1000 and class_gallery_count(100, 12) == 12
    assert class_gallery_count("25", 1000) == 25 and class_gallery_count(0, 5) == 0
    for bad in ("some", -1, True, 2.5, None):
        with pytest.raises(ConfigError, match="CLASS_GALLERIES"):
            Params(CLASS_GALLERIES=bad).validate()
    assert Params().CLASS_GALLERIES == 100
    assert Params().with_env({"GRADCAM_CLASS_GALLERIES": "all"}).CLASS_GALLERIES == "all"
    from helpers.__main__ import build_parser, params_from_args
    args = build_parser().parse_args(["analyze", "--class-galleries", "7"])
    assert class_gallery_count(params_from_args(args).CLASS_GALLERIES, 1000) == 7
    assert TOP_CLASSES == 50
