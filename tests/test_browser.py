"""The report page as a person uses it: index.html of a small real run, opened from disk in Debian's
headless Chromium (driven by Playwright, which never downloads a browser of its own), with scripts on and off.
tests/test_jupyterlab.py opens it inside JupyterLab."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import sklearn.metrics
from PIL import Image

from helpers.pipeline import Analysis

from browser import CHROMIUM, PLOTS_DRAWN, browser_page, cell_centre, click_cell, click_position, open_page, screenshot_report
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
    """Choose a colour in the explorer's menu and wait until Plotly has redrawn the trace."""
    page.select_option("#cm-colour", label=label)
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
    page.mouse.move(*cell_centre(page, r, c))
    label = page.locator("#confusion-matrix .hoverlayer .hovertext")
    label.wait_for(timeout=10_000)
    text = label.text_content()
    support = int((run.preds.labels == int(top.true_id)).sum())
    assert f"true: {top.true_name} · " in text and f"predicted: {top.pred_name} · " in text
    assert f"count: {int(top['count'])}" in text
    assert f"row %: {100 * int(top['count']) / support:.1f}%" in text
    # the first and last rows of the 100-row heatmap lie outside a 1000-px viewport until scrolled to
    for r, c in [(0, 99), (99, 0)]:
        true_name = page.evaluate("([r, c]) => document.getElementById('confusion-matrix').data[0].customdata[r][c][0]",
                                  [r, c])
        page.mouse.move(*cell_centre(page, r, c))
        page.wait_for_function("t => { const h = document.querySelector('#confusion-matrix .hoverlayer .hovertext');"
                               " return h && h.textContent.includes(t); }", arg=f"true: {true_name}", timeout=10_000)


def test_the_page_is_self_contained_and_every_link_resolves_to_a_file(run, page):
    """JupyterLab serves user HTML from a sandbox with a null origin and refuses every file it asks for, so the
    page loads nothing: plotly.js, the images and the numbers are inside it. Its links lead to the files."""
    index = run.out / "index.html"
    open_page(page, index)
    loads = page.evaluate("""() => [
        ...[...document.querySelectorAll('img[src], iframe[src], script[src], embed[src], source[src]')].map(e => e.src),
        ...[...document.querySelectorAll('link[href]')].map(e => e.href)]""")
    assert loads and all(u.startswith("data:image/jpeg;base64,") for u in loads), [u[:60] for u in loads]
    resources = page.evaluate("() => performance.getEntriesByType('resource').map(e => e.name)")
    assert [u for u in resources if not u.startswith("data:")] == []
    urls = page.evaluate("() => [...document.querySelectorAll('a[href]')].map(e => e.href)")
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
    # each embedded preview is its PNG, shrunk: same aspect ratio
    for rel in ("top_confused_pairs.png", "confusion_matrix_full.png"):
        with Image.open(run.out / rel) as im:
            ratio = im.width / im.height
        img = page.locator(f'a[href="{rel}"] img').first
        w, h = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
        assert abs(w / h - ratio) < 0.02 and w <= 1200


def _tile_pixels(page, k: int) -> np.ndarray:
    rgba = page.evaluate("""k => { const c = document.querySelectorAll('#cell-images canvas.cell-tile')[k];
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }""", k)
    w, h = page.evaluate("k => { const c = document.querySelectorAll('#cell-images canvas.cell-tile')[k]; "
                         "return [c.width, c.height]; }", k)
    return np.array(rgba, dtype=np.float64).reshape(h, w, 4)[..., :3]


def test_clicking_a_cell_shows_its_images_worst_first_with_both_cams(run, page):
    from helpers.compute.metrics import pair_examples
    open_page(page, run.out / "index.html")
    pr, conf = run.preds, run.results["confusion"]
    top = conf.pairs.iloc[0]
    t, p = int(top.true_id), int(top.pred_id)
    click_cell(page, t, p)
    page.wait_for_function("() => document.querySelectorAll('#cell-images canvas.cell-tile').length > 0 && "
                           "[...document.querySelectorAll('#cell-images canvas.cell-tile')].every(c => c.dataset.drawn === '1')")
    assert page.locator("#cell-images .cell-title").inner_text() == f"{run.names[t]} → {run.names[p]}"
    expected = pair_examples(pr.labels, pr.preds, pr.probs, t, p, run.params.CELL_IMAGES)
    captions = page.locator("#cell-images figcaption").all_inner_texts()
    assert [int(c.split(" ")[0][1:]) for c in captions] == expected.tolist()   # worst first
    assert f"p({run.names[p]}) {pr.probs[expected[0], p]:.2f}" in captions[0]
    # the tile is the image, its true-class CAM and its predicted-class CAM, as the galleries draw them
    cams_t = run.cams.get(expected[:1], [t])
    cams_p = run.cams.get(expected[:1], [p])
    want = np.concatenate([run.data.images[expected[0]], run.run.overlays(expected[:1], cams_t)[0],
                           run.run.overlays(expected[:1], cams_p)[0]], axis=1).astype(np.float64)
    got = _tile_pixels(page, 0)
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 8   # JPEG, quality 90, no chroma subsampling
    wrong_order = np.concatenate([want[:, 32:64], want[:, :32], want[:, 64:]], axis=1)
    assert np.abs(got - want).mean() < np.abs(got - wrong_order).mean() / 2
    # a row of the pairs table opens the same panel for its pair
    second = conf.pairs.iloc[1]
    page.locator(f'#pairs-table tr[data-true="{int(second.true_id)}"][data-pred="{int(second.pred_id)}"] td').first.click()
    page.wait_for_function("t => document.querySelector('#cell-images .cell-title').textContent === t",
                           arg=f"{run.names[int(second.true_id)]} → {run.names[int(second.pred_id)]}")
    n_shown = min(int(second["count"]), run.params.CELL_IMAGES)
    assert page.locator("#cell-images canvas.cell-tile").count() == n_shown


def test_collapsing_to_superclasses_then_drilling_into_a_cell(run, page):
    open_page(page, run.out / "index.html")
    page.select_option("#cm-scope", "groups")
    page.wait_for_function("() => window.cmView.mode === 'groups'")
    coarse = run.data.fine_to_coarse
    assert len(page.evaluate("() => window.cmView.ids")) == len(set(coarse.tolist()))
    z = np.array(_z(page))
    cm = run.results["confusion"].cm
    ids = page.evaluate("() => window.cmView.ids")
    onehot = np.eye(int(coarse.max()) + 1)[coarse]
    np.testing.assert_array_equal(z, (onehot.T @ cm @ onehot)[np.ix_(ids, ids)])
    a, b = ids[0], ids[1]
    click_position(page, 0, 1)
    page.wait_for_function("() => window.cmView.mode === 'classes'")
    shown = page.evaluate("() => window.cmView.ids")
    assert sorted(shown) == sorted(np.flatnonzero((coarse == a) | (coarse == b)).tolist())


def test_in_a_sandbox_without_scripts_the_static_figures_show(run, browser, tmp_path):
    """JupyterLab's HTML viewer shows a page in an iframe sandboxed without scripts until "Trust HTML": the page
    then shows its static figures and says how to get the interactive ones."""
    page, problems = browser
    problems.clear()
    wrapper = tmp_path / "viewer.html"
    wrapper.write_text(f'<iframe sandbox="allow-popups" style="width:1300px;height:900px" '
                       f'src="{(run.out / "index.html").resolve().as_uri()}"></iframe>')
    page.goto(wrapper.as_uri(), wait_until="load")
    frame = page.frame_locator("iframe")
    assert "Trust HTML" in frame.locator(".noscript").inner_text()
    assert frame.locator("#confusion-matrix").is_hidden() and frame.locator("#cm-scope").is_hidden()
    assert frame.locator('a[href="confusion_matrix_full.png"] img').is_visible()
    decoded = frame.locator("img").evaluate_all("imgs => imgs.filter(i => i.offsetParent)"
                                                ".map(i => i.complete && i.naturalWidth > 0)")
    assert len(decoded) >= 3 and all(decoded)
    # the only errors: the sandbox refusing the page's scripts
    assert problems and all("Blocked script execution" in p for p in problems)
    problems.clear()


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
