"""The report page as a person uses it: index.html of a small real run, opened from disk in Debian's
headless Chromium (driven by Playwright, which never downloads a browser of its own)."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import sklearn.metrics
from PIL import Image

from helpers.pipeline import Analysis

from browser import CHROMIUM, PLOTS_DRAWN, browser_page, open_page, screenshot_report
from conftest import run_params

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason=f"{CHROMIUM} is missing (CI installs it: apt-get install -y chromium)")

STANDALONE = ["per_class_accuracy_interactive.html", "confusion_matrix_interactive.html",
              "deep_dive/group_embedding.html"]


@pytest.fixture(scope="module")
def run(cifar_root, tiny_checkpoint, tmp_path_factory) -> Analysis:
    """A complete small run (100 classes, 400 images), galleries kept short to stay quick."""
    out = tmp_path_factory.mktemp("browser") / "gradcam_results"
    params = run_params(cifar_root, tiny_checkpoint, out, EMBEDDING="tsne",
                        N_WORST=2, N_BEST=1, N_PAIR_GALLERIES=3, PAIR_EXAMPLES=3)
    an = Analysis(params, progress=False)
    an.run_all()
    return an


@pytest.fixture(scope="module")
def browser():
    with browser_page(width=1400, height=1000) as (page, problems):
        yield page, problems


@pytest.fixture()
def page(browser):
    page, problems = browser
    problems.clear()
    yield page
    assert problems == [], f"JavaScript errors: {problems}"


def _z(page) -> list:
    return page.evaluate("() => document.getElementById('confusion-matrix').data[0].z")


def _click_view(page, label: str, colorbar: str) -> None:
    """Click one of the heatmap's view buttons and wait until Plotly has restyled the trace."""
    page.locator("#confusion-matrix g.updatemenu-button").filter(
        has=page.locator("text.updatemenu-item-text", has_text=label)).filter(
        has_not=page.locator("text.updatemenu-item-text", has_text=label + ",")).click()
    page.wait_for_function("t => document.getElementById('confusion-matrix').data[0].colorbar.title.text === t",
                           arg=colorbar)


def test_index_renders_its_plots_without_errors(run, page):
    open_page(page, run.out / "index.html")
    n_svgs = page.locator(".js-plotly-plot .main-svg").count()
    assert n_svgs >= 4  # each plot draws a main svg and an overlay svg
    ids = page.evaluate("() => [...document.querySelectorAll('.plotly-graph-div')].map(d => d.id)")
    assert ids == ["confusion-matrix", "per-class-accuracy"]
    kind = page.evaluate("() => document.getElementById('confusion-matrix').data[0].type")
    assert kind == "heatmap"
    assert page.locator("#confusion-matrix .hm image").count() == 1  # the heatmap's raster was painted
    titles = page.evaluate("() => [...document.querySelectorAll('.modebar-btn')].map(b => b.getAttribute('data-title'))")
    assert "Download plot as a PNG" in titles and not any("Share" in t for t in titles)  # nothing uploads
    n_bars = page.locator("#per-class-accuracy .bars path").count()
    assert n_bars == 100
    # every image shown on the page actually decoded
    broken = page.evaluate("() => [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
    assert broken == []
    assert page.locator("#summary").inner_text().count("%") >= 2
    assert f"{run.preds.accuracy:.2%}" in page.locator("#summary").inner_text()


def test_heatmap_matches_sklearn_and_the_toggle_switches_to_row_percent(run, page):
    open_page(page, run.out / "index.html")
    pr = run.preds
    conf = run.results["confusion"].values
    order = conf["order"]
    counts = sklearn.metrics.confusion_matrix(pr.labels, pr.preds, labels=list(range(100)))
    np.testing.assert_array_equal(np.array(_z(page)), counts[np.ix_(order, order)])
    # CIFAR-100 has superclasses: rows come in superclass blocks
    f2c = run.data.fine_to_coarse[order]
    assert (np.diff(f2c) != 0).sum() == 19

    _click_view(page, "row %", "row %")
    row = sklearn.metrics.confusion_matrix(pr.labels, pr.preds, labels=list(range(100)), normalize="true") * 100
    np.testing.assert_allclose(np.array(_z(page), dtype=float), row[np.ix_(order, order)], atol=0.051)

    _click_view(page, "row %, errors only", "row %<br>(errors)")
    z = np.array(_z(page), dtype=float)  # None -> nan
    assert np.isnan(np.diag(z)).all()
    off = ~np.eye(100, dtype=bool)
    np.testing.assert_allclose(z[off], row[np.ix_(order, order)][off], atol=0.051)

    _click_view(page, "counts", "count")
    np.testing.assert_array_equal(np.array(_z(page)), counts[np.ix_(order, order)])


def test_hovering_a_cell_shows_true_pred_count_and_row_percent(run, page):
    open_page(page, run.out / "index.html")
    conf = run.results["confusion"].values
    top = conf["pairs"].iloc[0]
    pos = {int(c): k for k, c in enumerate(conf["order"])}
    r, c = pos[int(top.true_id)], pos[int(top.pred_id)]
    page.locator("#confusion-matrix").scroll_into_view_if_needed()
    box = page.locator("#confusion-matrix .nsewdrag").first.bounding_box()
    page.mouse.move(box["x"] + (c + 0.5) * box["width"] / 100, box["y"] + (r + 0.5) * box["height"] / 100)
    label = page.locator("#confusion-matrix .hoverlayer .hovertext")
    label.wait_for(timeout=10_000)
    text = label.text_content()
    support = int((run.preds.labels == int(top.true_id)).sum())
    assert f"true: {top.true_name} · " in text and f"predicted: {top.pred_name} · " in text
    assert f"count: {int(top['count'])}" in text
    assert f"row %: {100 * int(top['count']) / support:.1f}%" in text


def test_every_link_image_and_frame_resolves_to_a_file(run, page):
    index = run.out / "index.html"
    open_page(page, index)
    urls = page.evaluate("""() => [
        ...[...document.querySelectorAll('a[href]')].map(e => e.href),
        ...[...document.querySelectorAll('img[src], iframe[src], script[src]')].map(e => e.src)]""")
    files = set()
    for url in urls:
        parsed = urlparse(url)
        assert parsed.scheme == "file", f"index.html points off the disk: {url}"
        path = Path(unquote(parsed.path))
        if path == index and parsed.fragment:
            assert page.locator(f"#{parsed.fragment}").count() == 1, url
            continue
        assert path.is_file(), f"index.html links to missing {url}"
        files.add(path.relative_to(run.out).as_posix())
    # the page reaches every CSV and PNG the run wrote, and the pair galleries from the pairs table
    written = {p.relative_to(run.out).as_posix() for p in run.out.rglob("*") if p.is_file()
               and not any(part.startswith(".") for part in p.relative_to(run.out).parts)}
    assert {f for f in written if f.endswith((".csv", ".png"))} <= files
    table_links = page.evaluate("() => [...document.querySelectorAll('#pairs-table a')].map(a => a.getAttribute('href'))")
    assert sum(h.startswith("confused_pair_") for h in table_links) == 3
    # the embedding iframe drew its own plot (it loads ../plotly.min.js)
    frame = page.frame_locator("iframe").first
    frame.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=30_000)


@pytest.mark.parametrize("rel", STANDALONE)
def test_other_html_outputs_open_alone_and_share_one_plotly(run, page, rel):
    path = run.out / rel
    assert path.stat().st_size < 1_000_000  # plotly.js (4.8 MB) is loaded, not inlined
    assert (run.out / "plotly.min.js").stat().st_size > 3_000_000
    open_page(page, path)
    assert page.evaluate(PLOTS_DRAWN)
    src = page.evaluate("() => [...document.scripts].map(s => s.src).filter(Boolean)")
    assert [Path(unquote(urlparse(s).path)).resolve() for s in src] == [(run.out / "plotly.min.js").resolve()]


def test_screenshot_of_the_report(run, page, tmp_path):
    png = screenshot_report(run.out / "index.html", tmp_path / "report.png", width=1400, height=1700, page=page)
    with Image.open(png) as im:
        assert im.size == (1400, 1700)
        pixels = np.asarray(im.convert("L"), dtype=float)
    # not a blank page: the heatmap and the cards add dark and coloured pixels to the white
    assert (pixels < 128).mean() > 0.005 and pixels.std() > 20
    print(f"screenshot: {png}")
