"""The images behind each confusion-matrix cell (compute.cells), the cluster groups of data without superclasses,
and the report's explorer at 1,000 classes in Chromium: top-N, collapsed groups, search."""
from __future__ import annotations

import numpy as np
import pytest

from helpers.compute.cells import cell_examples
from helpers.compute.metrics import pair_examples
from helpers.compute.ordering import cluster_groups, cluster_order


def _probs(labels, preds, n_classes, conf):
    """Softmax-like rows: `conf` on the prediction, the rest shared equally."""
    conf = np.broadcast_to(np.asarray(conf, dtype=np.float64), (len(labels),))
    p = np.repeat(((1 - conf) / (n_classes - 1))[:, None], n_classes, axis=1)
    p[np.arange(len(labels)), preds] = conf
    return p


def test_cells_by_hand():
    # cell 0->1: images 0, 2, 5 (confidences .6 .9 .7); cell 2->0: image 3; image 1 and 4 correct
    labels = np.array([0, 0, 0, 2, 1, 0])
    preds = np.array([1, 0, 1, 0, 1, 1])
    probs = _probs(labels, preds, 3, np.array([.6, .8, .9, .5, .9, .7]))
    ex = cell_examples(labels, preds, probs, per_cell=2, budget=10)
    assert ex.true.tolist() == [0, 2] and ex.pred.tolist() == [1, 0] and ex.count.tolist() == [3, 1]
    assert ex.images_of(0, 1).tolist() == [2, 5]          # worst (most confident in the wrong class) first
    assert ex.images_of(2, 0).tolist() == [3]
    assert ex.images_of(1, 2).tolist() == []
    assert ex.table().tolist() == [[0, 1, 3, 0, 2], [2, 0, 1, 2, 1]]
    # a budget of 2: the biggest cell takes both, the other shows none (and says so)
    ex = cell_examples(labels, preds, probs, per_cell=2, budget=2)
    assert ex.n_shown.tolist() == [2, 0] and ex.n_cells_without_images == 1
    ex = cell_examples(labels, preds, probs, per_cell=5, budget=2)
    assert ex.n_shown.tolist() == [2, 0] and ex.images_of(0, 1).tolist() == [2, 5]


def test_cells_match_the_pair_galleries_order_and_cover_every_error():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 20, 3000)
    preds = np.where(rng.random(3000) < 0.4, rng.integers(0, 20, 3000), labels)
    probs = rng.dirichlet(np.ones(20), 3000)
    ex = cell_examples(labels, preds, probs, per_cell=4, budget=10**6)
    wrong = labels != preds
    cm = np.zeros((20, 20), int)
    np.add.at(cm, (labels[wrong], preds[wrong]), 1)
    assert ex.n_cells == (cm > 0).sum() and ex.count.sum() == wrong.sum()
    assert (np.diff(ex.count) <= 0).all()
    for t, p, c in zip(ex.true, ex.pred, ex.count):
        assert c == cm[t, p]
        np.testing.assert_array_equal(ex.images_of(t, p), pair_examples(labels, preds, probs, t, p, 4))
    assert len(set(ex.shown.tolist())) == len(ex.shown) == np.minimum(ex.count, 4).sum()
    small = cell_examples(labels, preds, probs, per_cell=4, budget=100)
    assert small.n_shown.sum() == 100 and (small.n_shown[:25] == np.minimum(small.count[:25], 4)).all()


def test_cells_refuse_mismatched_inputs():
    with pytest.raises(ValueError):
        cell_examples(np.zeros(3, int), np.zeros(4, int), np.ones((3, 2)) / 2, 2, 2)
    with pytest.raises(ValueError):
        cell_examples(np.zeros(3, int), np.zeros(3, int), np.ones((3, 2)) / 2, -1, 2)


def test_cluster_groups_put_classes_that_swap_predictions_together():
    # three blocks of classes that confuse only one another
    cm = np.diag(np.full(9, 50))
    for block in ([0, 4, 8], [1, 3, 6], [2, 5, 7]):
        for a in block:
            for b in block:
                if a != b:
                    cm[a, b] = 10
    groups = cluster_groups(cm, 3)
    assert sorted(set(groups.tolist())) == [0, 1, 2]
    for block in ([0, 4, 8], [1, 3, 6], [2, 5, 7]):
        assert len(set(groups[block].tolist())) == 1
    assert groups[cluster_order(cm)[0]] == 0    # numbered along the matrix's order
    assert cluster_groups(np.diag(np.full(6, 5)), 3).tolist() == [0, 0, 1, 1, 2, 2]   # nothing confused


@pytest.fixture(scope="module")
def thousand_class_page(tmp_path_factory):
    """The explorer alone, for 1,000 classes with 5,000 errors, in a page that loads plotly.js and the explorer."""
    from plotly.offline import get_plotlyjs

    from helpers.plots.cell_tiles import tile_sheets
    from helpers.plots.explorer import EXPLORER_CSS, explorer_data, explorer_html
    rng = np.random.default_rng(0)
    n = 1000
    labels = np.repeat(np.arange(n), 20)
    preds = labels.copy()
    wrong = rng.random(len(labels)) < 0.25
    # errors mostly inside blocks of 10 neighbouring classes (the "superclasses")
    preds[wrong] = (labels[wrong] // 10) * 10 + rng.integers(0, 10, wrong.sum())
    probs = _probs(labels, preds, n, 0.9)
    cm = np.zeros((n, n), np.int64)
    np.add.at(cm, (labels, preds), 1)
    ex = cell_examples(labels, preds, probs, per_cell=2, budget=400)
    imgs = rng.integers(0, 255, (len(ex.shown), 32, 32, 3), dtype=np.uint8)
    tiles = tile_sheets(imgs, imgs, imgs)
    names = [f"class {i:04d}" for i in range(n)]
    groups = np.arange(n) // 10
    data = explorer_data(cm, names, np.arange(n), ex.table(), ex.shown, 2, 400, tiles,
                         probs[ex.shown, preds[ex.shown]], probs[ex.shown, labels[ex.shown]],
                         groups, [f"group {g}" for g in range(100)], "superclass")
    page = tmp_path_factory.mktemp("explorer") / "explorer.html"
    page.write_text(f"<!DOCTYPE html><html class='js'><head><meta charset='utf-8'><style>{EXPLORER_CSS}</style>"
                    f"<script>{get_plotlyjs()}</script></head><body>{explorer_html(data, tiles.sheets)}</body></html>",
                    encoding="utf-8")
    return page, cm, ex


def test_explorer_at_1000_classes_top_n_groups_and_search(thousand_class_page):
    from browser import CHROMIUM, browser_page, click_cell, open_page
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing")
    page_file, cm, ex = thousand_class_page
    off = cm - np.diag(np.diag(cm))
    involved = off.sum(0) + off.sum(1)
    with browser_page(width=1400, height=1000) as (page, problems):
        open_page(page, page_file)
        options = page.locator("#cm-scope option").all_inner_texts()
        assert not any(o.startswith("all") for o in options)    # 1,000 classes: no unreadable full view
        assert page.evaluate("() => window.cmView.ids.length") == 50   # the default: the top 50
        ids = page.evaluate("() => window.cmView.ids")
        top = np.lexsort((np.arange(1000), -involved))[:50]
        assert sorted(ids) == sorted(top.tolist())
        np.testing.assert_array_equal(np.array(page.evaluate(
            "() => document.getElementById('confusion-matrix').data[0].z")), cm[np.ix_(ids, ids)])
        page.select_option("#cm-scope", "groups")
        page.wait_for_function("() => window.cmView.mode === 'groups' && window.cmView.ids.length === 100")
        page.fill("#cm-search", "class 0421")
        page.press("#cm-search", "Enter")
        page.wait_for_function("() => window.cmView.ids.includes(421) && window.cmView.mode === 'classes'")
        shown = page.evaluate("() => window.cmView.ids")
        partners = np.flatnonzero((off[421] + off[:, 421]) > 0)
        assert set(shown) == {421} | set(partners.tolist())   # fewer than 15 partners here: all of them
        # the biggest cell has its images; one past the budget says how to include it
        t, p = int(ex.true[0]), int(ex.pred[0])
        page.fill("#cm-search", f"class {t:04d}")
        page.press("#cm-search", "Enter")
        page.wait_for_function(f"() => window.cmView.ids.includes({p})")
        click_cell(page, t, p)
        page.wait_for_function("() => document.querySelectorAll('#cell-images canvas.cell-tile[data-drawn=\"1\"]').length === 2")
        last = int(np.flatnonzero(ex.n_shown == 0)[0])
        page.evaluate(f"() => window.cmShowCell({int(ex.true[last])}, {int(ex.pred[last])})")
        assert "CELL_IMAGES_MAX" in page.locator("#cell-images").inner_text()
        assert problems == []


def test_explorer_says_when_cell_images_are_off(tmp_path):
    """CELL_IMAGES=0: a clicked cell says the images are off, not that a budget went to larger cells."""
    from plotly.offline import get_plotlyjs

    from browser import CHROMIUM, browser_page, click_cell, open_page
    from helpers.plots.cell_tiles import tile_sheets
    from helpers.plots.explorer import EXPLORER_CSS, explorer_data, explorer_html
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing")
    labels = np.repeat(np.arange(5), 10)
    preds = labels.copy()
    preds[:4] = 1
    probs = _probs(labels, preds, 5, 0.9)
    cm = np.zeros((5, 5), np.int64)
    np.add.at(cm, (labels, preds), 1)
    ex = cell_examples(labels, preds, probs, per_cell=0, budget=3000)
    assert ex.n_cells == 1 and ex.n_shown.tolist() == [0]
    tiles = tile_sheets([], [], [])
    data = explorer_data(cm, [f"c{i}" for i in range(5)], np.arange(5), ex.table(), ex.shown, 0, 3000, tiles,
                         np.zeros(0), np.zeros(0))
    page_file = tmp_path / "off.html"
    page_file.write_text(f"<!DOCTYPE html><html class='js'><head><meta charset='utf-8'><style>{EXPLORER_CSS}</style>"
                         f"<script>{get_plotlyjs()}</script></head><body>{explorer_html(data, [])}</body></html>",
                         encoding="utf-8")
    with browser_page() as (page, problems):
        open_page(page, page_file)
        click_cell(page, 0, 1)
        page.wait_for_function("() => document.querySelector('#cell-images .cell-title')")
        text = page.locator("#cell-images").inner_text()
        assert "c0 → c1" in text and "Cell images are off" in text and "went to larger cells" not in text
        assert page.locator("#cell-images canvas").count() == 0
        page.wait_for_timeout(600)   # two clicks closer than Plotly's double-click time are a double-click
        click_cell(page, 2, 2)   # the diagonal: correct predictions, no images
        page.wait_for_function("() => document.querySelector('#cell-images .cell-title').textContent.startsWith('c2:')")
        assert "10 of 10 correct" in page.locator("#cell-images .cell-title").inner_text()
        page.fill("#cm-search", "no such class")
        page.press("#cm-search", "Enter")
        page.wait_for_function("() => document.getElementById('cm-showing').textContent.startsWith('no class name')")
        assert page.evaluate("() => window.cmView.ids.length") == 5   # the view stays
        assert problems == []
