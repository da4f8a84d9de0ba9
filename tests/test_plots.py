"""Tests for helpers/plots/ (figures, gallery, interactive): every drawing function on small synthetic inputs."""
import matplotlib

matplotlib.use("Agg")  # tests run headless; the module itself never picks a backend

import base64
import io
import json
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from helpers.compute import metrics
from helpers.errors import ConfigError, NumericalError
from helpers.plots import figures, gallery, interactive
from helpers.plots.gallery import LAYOUT, GalleryRow

RNG = np.random.default_rng(0)


def _img(h=32, w=32, c=3):
    return RNG.integers(0, 256, (h, w, c), dtype=np.uint8)


def _rows(n, n_panels, ok=None, label="CAM → pred: tiger"):
    return [GalleryRow(image=_img(), title=f"true: leopard · pred: tiger (0.{i}7)",
                       panels=[(label, _img()) for _ in range(n_panels)], ok=ok) for i in range(n)]


def _expected_size(section_rows, ncols, tile, subtitle, n_bars):
    L = LAYOUT
    w = max(L.min_width, 2 * L.pad + ncols * tile + (ncols - 1) * L.gap)
    h = (2 * L.pad + L.title_h + (L.subtitle_h if subtitle else 0)
         + sum(L.section_h + n * (L.row_title_h + L.label_h + tile + L.row_gap) for n in section_rows)
         + n_bars * L.cbar_h)
    return w, h


def _is_blue(a):   # JET(0) is dark blue (0, 0, 127)
    return (a[..., 2] > 100) & (a[..., 0] < 60) & (a[..., 1] < 60)


def _is_red(a):    # JET(1) is dark red (127, 0, 0); wrong-row titles are (200, 0, 0)
    return (a[..., 0] > 100) & (a[..., 1] < 60) & (a[..., 2] < 60)


def _is_green(a):
    return (a[..., 1] > 90) & (a[..., 0] < 60) & (a[..., 2] < 60)


# ---------------------------------------------------------------- galleries


def test_long_gallery_titles_wrap_instead_of_losing_their_end(monkeypatch):
    drawn = []
    text_mask = gallery._text_mask
    monkeypatch.setattr(gallery, "_text_mask", lambda text, font, anchor: drawn.append(text) or text_mask(text, font, anchor))
    name = "greater spotted woodpecker in flight over the lake"
    title = f"Class 042: {name} — accuracy 12.5% ({len(name)} characters of class name, gradcam)"
    row_title = f"#1234 · true: {name} (0.12) · pred: lesser spotted woodpecker on a branch (0.81)"
    rows = [GalleryRow(image=_img(), title=row_title, panels=[("CAM → pred: tiger", _img())], ok=False)]
    img = gallery.render_gallery(title, [("1 worst predictions", rows)], tile=128)
    title_lines = [s for s in drawn if len(s) > 5 and s in title]   # not the colour bar ticks "0", "1"
    row_lines = [s for s in drawn if len(s) > 5 and s in row_title]
    assert len(title_lines) >= 2 and " ".join(title_lines) == title          # whole, across lines
    assert len(row_lines) >= 2 and " ".join(row_lines) == row_title
    assert not any("…" in s for s in drawn)
    L = LAYOUT
    w, h = _expected_size([1], 2, 128, None, 1)
    assert img.size == (w, h + (len(title_lines) - 1) * L.title_line_h + (len(row_lines) - 1) * L.row_title_line_h)


def test_gallery_size_colour_bar_and_title_colours():
    sections = [("5 worst predictions", _rows(5, 2, ok=False)), ("3 best predictions", _rows(3, 2, ok=True))]
    img = gallery.render_gallery("Class 42: leopard", sections, tile=128, subtitle="acc 45%")
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert img.size == _expected_size([5, 3], ncols=3, tile=128, subtitle=True, n_bars=1)

    a = np.asarray(img)
    L = LAYOUT
    cbar = a[-(L.pad + L.cbar_h):]
    assert _is_blue(cbar).any() and _is_red(cbar).any()

    first_title_y = L.pad + L.title_h + L.subtitle_h + L.section_h
    wrong_strip = a[first_title_y:first_title_y + L.row_title_h]
    assert _is_red(wrong_strip).sum() > 20 and not _is_green(wrong_strip).any()
    row_h = L.row_title_h + L.label_h + 128 + L.row_gap
    ok_y = first_title_y + 5 * row_h + L.section_h
    ok_strip = a[ok_y:ok_y + L.row_title_h]
    assert _is_green(ok_strip).sum() > 20 and not _is_red(ok_strip).any()


def test_gallery_tiles_are_upscaled_originals():
    image = _img()
    img = gallery.render_gallery("t", [("s", [GalleryRow(image=image, title="x", panels=[])])], tile=128)
    L = LAYOUT
    y0 = L.pad + L.title_h + L.section_h + L.row_title_h + L.label_h
    tile = np.asarray(img)[y0:y0 + 128, L.pad:L.pad + 128]
    np.testing.assert_array_equal(tile, np.kron(image, np.ones((4, 4, 1), dtype=np.uint8)))


def test_gallery_blank_cells_grayscale_and_difference_bar():
    d = gallery.difference_panel(np.ones((28, 28)), np.zeros((28, 28)))
    gray = RNG.integers(0, 256, (28, 28, 1), dtype=np.uint8)
    rows = [GalleryRow(image=gray, title="true: shirt · pred: T-shirt (0.91)",
                       panels=[("CAM → pred: T-shirt", _img(28, 28)), ("difference true − pred", d)], ok=False),
            GalleryRow(image=gray, title="fewer panels", panels=[("CAM → pred", _img(28, 28))], ok=None)]
    img = gallery.render_gallery("pair", [("confused", rows), ("nothing here", [])], tile=96)
    assert img.size == _expected_size([2, 0], ncols=3, tile=96, subtitle=False, n_bars=2)
    a = np.asarray(img)
    L = LAYOUT
    diff_bar = a[-(L.pad + L.cbar_h):]
    rdbu_r = matplotlib.colormaps["RdBu_r"]
    lo = (np.array(rdbu_r(0.0)[:3]) * 255).round()
    hi = (np.array(rdbu_r(1.0)[:3]) * 255).round()
    flat = diff_bar.reshape(-1, 3).astype(int)
    assert (np.abs(flat - lo).sum(1) <= 3).any() and (np.abs(flat - hi).sum(1) <= 3).any()
    jet_bar = a[-(L.pad + 2 * L.cbar_h):-(L.pad + L.cbar_h)]
    assert _is_blue(jet_bar).any() and _is_red(jet_bar).any()
    # second row has one panel: its third tile stays blank (white)
    y1 = L.pad + L.title_h + L.section_h + (L.row_title_h + L.label_h + 96 + L.row_gap) + L.row_title_h + L.label_h
    x3 = L.pad + 2 * (96 + L.gap)
    assert (a[y1:y1 + 96, x3:x3 + 96] == 255).all()


def test_gallery_rejects_tiny_tile():
    with pytest.raises(ConfigError):
        gallery.render_gallery("t", [], tile=8)


def test_gallery_timing_100_galleries():
    sections = [("5 worst predictions", _rows(5, 3, ok=False)), ("3 best predictions", _rows(3, 3, ok=True))]
    gallery.render_gallery("warm-up", sections)  # font loading is a one-off cost
    t0 = time.perf_counter()
    for i in range(100):
        gallery.render_gallery(f"Class {i:03d}: leopard", sections, subtitle="accuracy 45%")
    ms = (time.perf_counter() - t0) * 1000 / 100
    print(f"\n[timing] render_gallery, 8 rows × 3 panels of 32×32, tile 128: {ms:.1f} ms per gallery")


def test_difference_panel_colours_and_errors():
    cam_true = np.array([[1.0, 0.0], [0.5, 0.3]])
    cam_pred = np.array([[0.0, 1.0], [0.5, 0.3]])
    out = gallery.difference_panel(cam_true, cam_pred)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    cmap = matplotlib.colormaps["RdBu_r"]
    for (i, j), x in {(0, 0): 1.0, (0, 1): 0.0, (1, 0): 0.5}.items():
        np.testing.assert_allclose(out[i, j], np.array(cmap(x)[:3]) * 255, atol=1)
    assert out[0, 0, 0] > out[0, 0, 2]  # true-class region: red
    assert out[0, 1, 2] > out[0, 1, 0]  # predicted-class region: blue
    with pytest.raises(ValueError):
        gallery.difference_panel(np.zeros((2, 2)), np.zeros((3, 3)))
    with pytest.raises(NumericalError):
        gallery.difference_panel(np.full((2, 2), np.nan), np.zeros((2, 2)))


# ---------------------------------------------------------------- confusion matrices

def test_confusion_matrix_100_classes_labels_and_png_size():
    C = 100
    names = [f"class {i}" for i in range(C)]
    cm = RNG.integers(0, 3, (C, C)) + np.diag(np.full(C, 60))
    order = np.roll(np.arange(C), 5)
    fig = figures.plot_confusion_matrix(cm, names, normalize=True, order=order, group_boundaries=[5, 50])
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    xt = [t.get_text() for t in ax.get_xticklabels()]
    yt = [t.get_text() for t in ax.get_yticklabels()]
    assert len(xt) == len(yt) == C
    assert xt == yt == [names[i] for i in order]
    acc = np.trace(cm) / cm.sum()
    assert f"{acc:.1%}" in ax.get_title()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=30)
    w, h = fig.get_size_inches()
    assert (w, h) == (28, 26)
    assert Image.open(io.BytesIO(buf.getvalue())).size == (round(w * 30), round(h * 30))


def test_confusion_matrix_small_annotates_counts():
    cm = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 9]])
    fig = figures.plot_confusion_matrix(cm, ["cat", "dog", "bird"], title="Test set")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == [str(v) for v in cm.ravel()]
    assert "Test set" in fig.axes[0].get_title() and "84.0%" in fig.axes[0].get_title()  # 21/25
    with pytest.raises(ValueError):
        figures.plot_confusion_matrix(cm, ["a", "b"])


def test_group_and_coarse_confusion_annotations():
    counts = np.array([[7, 3], [1, 9]])
    row_pct = 100 * counts / counts.sum(1, keepdims=True)
    fig = figures.plot_group_confusion(counts, row_pct, ["vehicles", "animals"])
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["7\n(70.0%)", "3\n(30.0%)", "1\n(10.0%)", "9\n(90.0%)"]
    # fractions are accepted too
    fig2 = figures.plot_group_confusion(counts, row_pct / 100, ["vehicles", "animals"])
    assert [t.get_text() for t in fig2.axes[0].texts] == texts

    cm20 = RNG.integers(0, 5, (20, 20)) + np.diag(np.full(20, 80))
    fig3 = figures.plot_coarse_confusion(cm20, [f"super {i}" for i in range(20)])
    assert isinstance(fig3, Figure) and len(fig3.axes[0].texts) == 400
    expected = 100 * cm20[0, 0] / cm20[0].sum()
    assert fig3.axes[0].texts[0].get_text() == f"{expected:.1f}"


def test_head_cosine():
    v = RNG.normal(size=(4, 16))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    sim = v @ v.T
    fig = figures.plot_head_cosine(sim, ["a", "b", "c", "d"])
    im = fig.axes[0].images[0]
    assert im.norm.vmin == -1 and im.norm.vmax == 1
    assert fig.axes[0].texts[0].get_text() == "1.00"


# ---------------------------------------------------------------- pairs, per-class accuracy

def _pairs_df():
    return pd.DataFrame({"true_name": ["leopard", "boy", "maple tree"], "pred_name": ["tiger", "man", "oak tree"],
                         "count": [5, 12, 8], "share_of_true": [0.05, 0.12, 0.08],
                         "same_superclass": [True, True, False]})


def test_top_pairs_order_and_text():
    fig = figures.plot_top_pairs(_pairs_df())
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["boy → man", "maple tree → oak tree", "leopard → tiger"]
    assert ax.yaxis_inverted()  # first label is on top
    assert [t.get_text() for t in ax.texts] == ["12 (12.0%)", "8 (8.0%)", "5 (5.0%)"]
    assert ax.get_legend() is not None
    assert isinstance(figures.plot_top_pairs(_pairs_df().iloc[:0]), Figure)
    with pytest.raises(ConfigError):
        figures.plot_top_pairs(pd.DataFrame({"x": [1]}))


def test_top_pairs_colours_exactly_the_pairs_in_the_same_superclass(tmp_path):
    """The red bars of top_confused_pairs.png are exactly the pairs most_confused_pairs.csv marks "yes", with
    True, False and <NA> (a class without superclass) mixed. Under pandas 3 the former "yes"/"no" strings all
    read as True and every bar came out red; strings are now refused."""
    f2c = np.array([0, 0, 1, 1, 2, -1])            # c5 has no superclass: its pairs are <NA>
    cm = np.diag(np.full(6, 50))
    for (t, p), n in {(0, 1): 9, (2, 3): 8, (0, 2): 7, (4, 1): 6, (5, 0): 5, (3, 5): 4, (1, 0): 3}.items():
        cm[t, p] = n
    pairs = metrics.most_confused(cm, [f"c{i}" for i in range(6)], k=None, fine_to_coarse=f2c)
    assert set(map(str, pairs["same_superclass"])) == {"True", "False", "<NA>"}
    csv = tmp_path / "most_confused_pairs.csv"
    metrics.pairs_for_csv(pairs).to_csv(csv, index=False)    # as the confusion step writes it
    table = pd.read_csv(csv, keep_default_na=False)
    same_in_csv = {f"{r.true_name} → {r.pred_name}" for r in table.itertuples() if r.same_superclass == "yes"}
    assert set(table["same_superclass"]) == {"yes", "no", ""}

    ax = figures.plot_top_pairs(pairs).axes[0]
    red = matplotlib.colors.to_rgba("#d62728")
    bars = ax.patches                              # one per pair, in the order of the tick labels
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(bars) == len(labels) == len(table)
    coloured = {label for label, bar in zip(labels, bars) if bar.get_facecolor() == red}
    assert coloured == same_in_csv and len(coloured) == 3     # c0→c1, c2→c3, c1→c0
    with pytest.raises(ConfigError, match="same_superclass"):
        figures.plot_top_pairs(metrics.pairs_for_csv(pairs))


def _per_class_df():
    return pd.DataFrame({
        "class_name": ["apple", "aquarium fish", "baby", "bear"], "superclass": ["fruit", "fish", "people", "mammals"],
        "accuracy": [0.9, 0.4, 0.6, 0.75], "correct": [90, 40, 60, 75], "support": [100] * 4,
        "mean_confidence": [0.93, 0.55, 0.7, 0.8], "top_wrong_prediction": ["pear", "flatfish", "girl", "otter"],
        "top_wrong_count": [4, 20, 15, 9]})


class _Scripts(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.n_scripts = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.n_scripts += 1
            src = dict(attrs).get("src")
            if src:
                self.srcs.append(src)


def _assert_offline(page: str):
    parser = _Scripts()
    parser.feed(page)
    assert parser.n_scripts >= 1
    assert not any("cdn" in s or s.startswith("http") for s in parser.srcs), parser.srcs
    assert 'src="https://cdn' not in page and "cdn.plot.ly/plotly" not in page.split("<body")[0]
    assert len(page) > 1_000_000  # plotly.js itself is inlined


def test_per_class_accuracy_html_offline():
    page = interactive.per_class_accuracy_html(_per_class_df())
    _assert_offline(page)
    for name in ["apple", "aquarium fish", "baby", "bear", "flatfish"]:
        assert name in page
    assert "mean accuracy 66.2%" in page  # (0.9+0.4+0.6+0.75)/4


# ---------------------------------------------------------------- embeddings

def _embedding_data(n=40):
    coords = RNG.normal(size=(n, 2))
    labels = np.array([3, 7] * (n // 2))
    preds = labels.copy()
    preds[:5] = np.where(labels[:5] == 3, 7, 3)
    return coords, labels, preds


def test_plot_embedding_marks_misclassified():
    coords, labels, preds = _embedding_data()
    names = [f"c{i}" for i in range(10)]
    fig = figures.plot_embedding(coords, labels, preds, [3, 7], names, "UMAP")
    ax = fig.axes[0]
    assert "UMAP" in ax.get_title()
    # per class: a circle collection (correct) and an 'x' collection (wrong); offsets count the points
    wrong_points = sum(len(c.get_offsets()) for c in ax.collections[1::2])
    assert wrong_points == int((preds != labels).sum())
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == ["c3 (20)", "c7 (20)"]
    # names given per class id in class_ids also work
    fig2 = figures.plot_embedding(coords, labels, preds, [3, 7], ["three", "seven"], "t-SNE")
    assert [t.get_text() for t in fig2.axes[0].get_legend().get_texts()][:2] == ["three (20)", "seven (20)"]


def test_thumbnail_data_uri_decodes():
    small = _img(28, 28, 1)   # fits: its own pixels, scaled up by the page
    decoded = Image.open(io.BytesIO(base64.b64decode(interactive.thumbnail_data_uri(small, size=64).split(",", 1)[1])))
    assert decoded.size == (28, 28)
    assert np.array_equal(np.asarray(decoded.convert("L")), small[..., 0])
    big = _img(200, 100, 3)   # shrunk to fit 64×64, aspect kept
    uri = interactive.thumbnail_data_uri(big, size=64)
    assert uri.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert decoded.size == (32, 64)
    expected = np.asarray(Image.fromarray(big).resize((32, 64), Image.BILINEAR))
    assert np.array_equal(np.asarray(decoded.convert("RGB")), expected)


def test_embedding_html_hover_thumbnails_offline():
    coords, labels, preds = _embedding_data()
    thumbs = [interactive.thumbnail_data_uri(_img()) for _ in range(len(coords))]
    page = interactive.embedding_html(coords, labels, preds, [3, 7], ["three", "seven"], thumbs, "UMAP",
                                "silhouette 0.12 <low>")
    _assert_offline(page)
    # our listener (plotly.js itself also mentions plotly_hover), bound to the plot's real div id
    div_id = re.search(r'<div id="([^"]+)" class="plotly-graph-div"', page).group(1)
    assert "plot.on('plotly_hover'" in page and f"getElementById('{div_id}')" in page
    assert "{plot_id}" not in page and 'id="emb-thumb"' in page
    assert page.count("data:image/png;base64,") >= len(coords)
    assert "silhouette 0.12 &lt;low&gt;" in page  # escaped
    assert "three" in page and "seven" in page
    with pytest.raises(ValueError):
        interactive.embedding_html(coords, labels, preds, [3, 7], ["three", "seven"], thumbs[:3], "UMAP", "")


# ---------------------------------------------------------------- deep dive

def test_plot_occlusion_layout():
    n = 2
    fig = figures.plot_occlusion([_img() for _ in range(n)], [_img() for _ in range(n)],
                               [RNG.normal(size=(8, 8)), RNG.random((8, 8))], ["img 1", "img 2"])
    assert isinstance(fig, Figure)
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 3 * n
    assert len(fig.axes) == 3 * n + n  # one colour bar per occlusion map
    signed = image_axes[2].images[0]
    assert signed.norm.vmin == -signed.norm.vmax  # diverging map centred on 0 when negative values occur


def test_reliability_diagram():
    edges = np.linspace(0, 1, 11)
    bins = pd.DataFrame({"bin_lower": edges[:-1], "bin_upper": edges[1:],
                         "count": [0, 0, 3, 10, 20, 30, 40, 60, 120, 700],
                         "accuracy": [0, 0, .2, .3, .4, .5, .6, .65, .75, .95],
                         "confidence": [0, 0, .25, .35, .45, .55, .65, .75, .85, .97]})
    fig = figures.plot_reliability_diagram(bins, 0.0321)
    assert "ECE = 3.21%" in fig.axes[0].get_title()
    assert len(fig.axes) == 2
    with pytest.raises(ConfigError):
        figures.plot_reliability_diagram(bins.drop(columns=["confidence"]), 0.1)


def test_label_suspects_grid_layout_and_pixels():
    n = 30
    images = [np.full((32, 32, 3), 8 * i, np.uint8) for i in range(n)]
    img = gallery.render_label_suspects(images, [f"g{i}" for i in range(n)], [f"p{i}" for i in range(n)],
                                      np.full(n, 0.01), np.full(n, 0.97), ncols=6)
    L, tile = gallery.LAYOUT, gallery.SUSPECT_TILE
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    cell_h = gallery.SUSPECT_CAPTION_H + tile + L.row_gap
    # only the first 24 are drawn: 4 rows of 6
    assert img.size == (2 * L.pad + 6 * tile + 5 * L.gap, 2 * L.pad + L.title_h + 4 * cell_h)
    a = np.asarray(img)
    for k in (0, 7, 23):   # each image fills its tile (32 px shown 6x = 192 px, centred) with its own pixels
        r, c = divmod(k, 6)
        x = L.pad + c * (tile + L.gap) + tile // 2
        y = L.pad + L.title_h + r * cell_h + gallery.SUSPECT_CAPTION_H + tile // 2
        assert (a[y, x] == 8 * k).all()
    # the captions are drawn: red "label" text and black "model" text above the first tile
    caption = a[L.pad + L.title_h: L.pad + L.title_h + gallery.SUSPECT_CAPTION_H, L.pad:L.pad + tile]
    reddish = (caption[..., 0] > 150) & (caption[..., 1] < 100)
    dark = caption.max(axis=-1) < 80
    assert reddish[:16].sum() > 20 and dark[16:].sum() > 20
    empty = gallery.render_label_suspects([], [], [], [], [])
    assert isinstance(empty, Image.Image) and empty.size[1] == 2 * L.pad + L.title_h
    with pytest.raises(ValueError):
        gallery.render_label_suspects(images, ["g"], ["p"], [0.1], [0.9])


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_hover_listener_shows_thumbnail_in_node():
    """Run the hover JS against a minimal fake DOM: hovering point i must show thumbnail i."""
    js = interactive._HOVER_JS.replace("{plot_id}", "plot")
    harness = """
    const els = {plot: {handlers: {}, on(n, f) { this.handlers[n] = f; }},
                 'emb-thumb': {src: '', style: {}}, 'emb-caption': {textContent: ''}};
    global.document = {getElementById: (id) => els[id]};
    global.window = {EMB_THUMBS: ['data:a', 'data:b', 'data:c']};
    %s
    els.plot.handlers['plotly_hover']({points: [{customdata: [2, 'cat', 'dog']}]});
    console.log(JSON.stringify({src: els['emb-thumb'].src, cap: els['emb-caption'].textContent,
                                vis: els['emb-thumb'].style.visibility}));
    """ % js
    out = subprocess.run(["node", "-e", harness], capture_output=True, text=True, timeout=20, check=True)
    state = json.loads(out.stdout)
    assert state == {"src": "data:c", "cap": "true: cat \u00b7 predicted: dog (wrong)", "vis": "visible"}


def test_gallery_fits_large_non_square_images_in_the_tile():
    big = RNG.integers(0, 256, (200, 150, 3), dtype=np.uint8)
    row = GalleryRow(image=big, title="big", panels=[("CAM", RNG.integers(0, 256, (200, 150, 3), dtype=np.uint8))])
    img = gallery.render_gallery("t", [("s", [row])], tile=100)
    assert img.size == _expected_size([1], ncols=2, tile=100, subtitle=False, n_bars=1)
    L = LAYOUT
    y0 = L.pad + L.title_h + L.section_h + L.row_title_h + L.label_h
    tile = np.asarray(img)[y0:y0 + 100, L.pad:L.pad + 100]
    # 200×150 shrinks to 100×75, centred: 12-px white bands left and right
    assert (tile[:, :12] == 255).all() and (tile[:, -12:] == 255).all()
    assert not (tile[:, 13:87] == 255).all()


def test_tile_labels_keep_class_names_whole():
    text, font = gallery._fit_label("CAM → pred: T-shirt/top", 128)
    assert "T-shirt/top" in text and font.getlength(text) <= 128
    assert gallery._fit_label("input", 128)[0] == "input"
    long_text, font = gallery._fit_label("CAM → true: an extremely long class name indeed", 128)
    assert long_text.endswith("…") and font.getlength(long_text) <= 128


@pytest.mark.parametrize("names", [[f"superclass with a long name {i}" for i in range(20)],
                                   ["a very long superclass name number one", "b", "c"]])
def test_superclass_matrix_keeps_every_label_inside_the_figure(names):
    """Fixed margins (> 12 groups) and the grown constrained figure (few groups) both fit the rotated names, the
    title and the colour-bar label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    k = len(names)
    cm = np.full((k, k), 3) + np.diag(np.full(k, 90))
    fig = figures.plot_coarse_confusion(cm, names)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer, box = canvas.get_renderer(), fig.bbox
    texts = [t for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels()
             + [ax.title, ax.xaxis.label, ax.yaxis.label] if t.get_text()]
    assert len(texts) >= 2 * k + 3
    for t in texts:
        e = t.get_window_extent(renderer)
        assert e.x0 >= -1 and e.y0 >= -1 and e.x1 <= box.x1 + 1 and e.y1 <= box.y1 + 1, t.get_text()
