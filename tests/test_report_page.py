"""The parts of index.html computed or drawn in Python: confusion orderings, row %, the heatmap figure."""
from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics

from helpers.compute import metrics
from helpers.compute import ordering
from helpers.plots import interactive

RNG = np.random.default_rng(0)


def _blocky_cm(blocks: list[list[int]], n: int, rng) -> np.ndarray:
    """Diagonal-heavy confusion where classes confuse only (and often) inside their block."""
    cm = np.diag(rng.integers(40, 60, n))
    for block in blocks:
        for a in block:
            for b in block:
                if a != b:
                    cm[a, b] = rng.integers(3, 12)
    return cm


def _random_blocks(n_blocks: int, size: int, rng) -> list[list[int]]:
    ids = rng.permutation(n_blocks * size)
    return [sorted(ids[k * size:(k + 1) * size].tolist()) for k in range(n_blocks)]


def _contiguous(order: np.ndarray, members) -> bool:
    pos = sorted(np.flatnonzero(np.isin(order, list(members))))
    return pos == list(range(pos[0], pos[0] + len(members)))


def test_row_percent_matches_sklearn_and_marks_empty_rows():
    labels = RNG.integers(0, 6, 300)
    labels[labels == 4] = 5                       # class 4 has no test images
    preds = np.where(RNG.random(300) < 0.6, labels, RNG.integers(0, 6, 300))
    cm = metrics.confusion_matrix(labels, preds, 6)
    got = ordering.row_percent(cm)
    expected = sklearn.metrics.confusion_matrix(labels, preds, labels=range(6), normalize="true") * 100
    keep = np.arange(6) != 4
    np.testing.assert_allclose(got[keep], expected[keep])
    assert np.isnan(got[4]).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cluster_order_puts_each_confusable_block_together(seed):
    rng = np.random.default_rng(seed)
    blocks = _random_blocks(4, 4, rng)
    cm = _blocky_cm(blocks, 16, rng)
    cm[blocks[0][0], blocks[1][0]] = 1            # a stray error between blocks must not split them
    order = ordering.cluster_order(cm)
    assert sorted(order.tolist()) == list(range(16))
    for block in blocks:
        assert _contiguous(order, block), (order, block)
    # the id order would not have passed: the blocks were scattered over the ids
    assert not all(_contiguous(np.arange(16), b) for b in blocks)


def test_cluster_order_without_confusion_keeps_the_class_order():
    np.testing.assert_array_equal(ordering.cluster_order(np.diag([5, 3, 0, 7])), np.arange(4))
    np.testing.assert_array_equal(ordering.cluster_order(np.array([[1, 2], [0, 3]])), [0, 1])
    with pytest.raises(ValueError, match="square"):
        ordering.cluster_order(np.zeros((2, 3)))


def test_coarse_matrix_matches_the_image_level_superclass_confusion():
    f2c = np.array([2, 0, 1, 0, 2, 1, 1])
    labels = RNG.integers(0, 7, 500)
    preds = np.where(RNG.random(500) < 0.5, labels, RNG.integers(0, 7, 500))
    cm = metrics.confusion_matrix(labels, preds, 7)
    np.testing.assert_array_equal(ordering.coarse_matrix(cm, f2c),
                                  metrics.coarse_confusion_matrix(labels, preds, f2c, 3))


def test_superclass_order_groups_by_superclass_and_neighbours_confusable_ones():
    rng = np.random.default_rng(3)
    f2c = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])   # superclasses interleaved over the ids
    cm = np.diag(rng.integers(40, 60, 12))
    cm[0, 2] = cm[4, 6] = cm[2, 8] = 15                    # superclass 0 is confused with 2
    cm[1, 3] = 2
    order = ordering.superclass_order(cm, f2c)
    assert sorted(order.tolist()) == list(range(12))
    groups = f2c[order]
    runs = [g for k, g in enumerate(groups) if k == 0 or g != groups[k - 1]]
    assert sorted(runs) == [0, 1, 2, 3]                    # each superclass is one run
    assert abs(runs.index(0) - runs.index(2)) == 1          # the confused superclasses are adjacent
    spans = ordering.block_spans(order, f2c)
    assert [(a, b) for a, b, _ in spans] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert [g for _, _, g in spans] == runs


def test_unknown_superclass_forms_its_own_last_group():
    f2c = np.array([1, 0, -1, 1, 0])
    cm = np.diag([5, 5, 5, 5, 5])
    order, how = ordering.confusion_order(cm, f2c)
    assert how == "superclass" and order[-1] == 2
    assert ordering.confusion_order(cm)[1] == "clustering"
    assert ordering.block_spans(order, f2c)[-1] == (4, 5, -1)


def test_heatmap_figure_views_hover_and_blocks():
    cm = np.array([[5, 2, 0], [1, 6, 0], [0, 0, 0]])
    row = ordering.row_percent(cm)
    order = np.array([2, 0, 1])
    fig = interactive.confusion_heatmap_figure(cm, row, ["a", "b", "c"], order, superclasses=["x", "x", "y"],
                                         spans=[(0, 1, 1), (1, 3, 0)], title="t")
    trace = fig.data[0]
    assert trace.type == "heatmap"
    np.testing.assert_array_equal(np.array(trace.z), cm[np.ix_(order, order)])
    assert list(trace.y) == ["c · y", "a · x", "b · x"] and list(trace.x) == list(trace.y)
    assert list(fig.layout.yaxis.ticktext) == ["c", "a", "b"]
    # hover data: count and row % of the cell true=a (row 1) -> pred=b (col 2)
    assert list(trace.customdata[1][2]) == [2, f"{200 / 7:.1f}%"]
    assert trace.customdata[0][0][1] == "n/a (no images)"     # class c has no images
    assert trace.texttemplate == "%{z}"                       # few classes: values written in the cells
    assert "true: %{y}" in trace.hovertemplate and "row %: %{customdata[1]}" in trace.hovertemplate
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == list(interactive.CONFUSION_VIEWS)
    z_counts, z_pct, z_err = (b.args[0]["z"][0] for b in buttons)
    assert z_counts == cm[np.ix_(order, order)].tolist()
    assert z_pct[1] == [0.0, round(500 / 7, 1), round(200 / 7, 1)] and z_pct[0] == [None, None, None]
    assert z_err[1][1] is None and z_err[1][2] == round(200 / 7, 1)
    assert [b.args[0]["zmax"][0] for b in buttons] == [6, round(600 / 7, 1), round(200 / 7, 1)]
    assert [(s.x0, s.x1) for s in fig.layout.shapes] == [(-0.5, 0.5), (0.5, 2.5)]
    with pytest.raises(ValueError):
        interactive.confusion_heatmap_figure(cm, row, ["a", "b", "c"], [0, 0, 1])


def test_pages_never_load_plotly_from_a_cdn():
    assert interactive.include_plotlyjs("inline") is True
    assert interactive.include_plotlyjs("../plotly.min.js") == "../plotly.min.js"
    for bad in ("https://cdn.plot.ly/plotly-2.35.2.min.js", "//cdn.plot.ly/plotly.js", "cdn"):
        with pytest.raises(ValueError):
            interactive.include_plotlyjs(bad)
    fig = interactive.confusion_heatmap_figure(np.eye(2, dtype=int), np.eye(2) * 100, ["a", "b"], [0, 1])
    page = interactive.confusion_heatmap_html(fig, "plotly.min.js")
    assert '<script charset="utf-8" src="plotly.min.js"></script>' in page
    assert "cdn.plot.ly" not in page and len(page) < 100_000
