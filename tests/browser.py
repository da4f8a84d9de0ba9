"""Open the generated report in Debian's headless Chromium through Playwright (Python).

Playwright drives /usr/bin/chromium (`apt-get install chromium`); it never downloads a browser of
its own (`playwright install` is never run). Every launch gets a fresh, throwaway profile.

    from browser import screenshot_report
    screenshot_report(Path("gradcam_results/index.html"), Path("docs/report.png"))
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

# True once every Plotly graph div on the page has drawn its SVG.
PLOTS_DRAWN = """() => {
  const divs = [...document.querySelectorAll('.plotly-graph-div')];
  return divs.length > 0 && divs.every(d => d.querySelector('.main-svg') && d._fullLayout);
}"""


@contextmanager
def browser_page(width: int = 1400, height: int = 1000, javascript: bool = True) -> Iterator[tuple[object, list[str]]]:
    """Yield (page, problems): a page of a fresh headless Chromium, and a list that collects every
    console error and uncaught page error (from the page and its frames) while it is open.
    javascript=False: scripts off, as in JupyterLab's HTML viewer before "Trust HTML"."""
    from playwright.sync_api import sync_playwright
    if not CHROMIUM.exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing; install Debian's chromium (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height}, java_script_enabled=javascript)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            problems: list[str] = []
            page.on("console", lambda msg: problems.append(f"console.{msg.type}: {msg.text} ({msg.location})")
                    if msg.type == "error" else None)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            yield page, problems
        finally:
            context.close()


def open_page(page, html_file: Path, timeout_ms: int = 60_000) -> None:
    """Load a local HTML file through file:// and wait until its Plotly graphs are drawn."""
    page.goto(Path(html_file).resolve().as_uri(), wait_until="load")
    page.wait_for_function(PLOTS_DRAWN, timeout=timeout_ms)


def click_cell(page, true_id: int, pred_id: int) -> None:
    """Click the confusion explorer's cell (row true_id, column pred_id) of the view shown, as a user does."""
    ids = page.evaluate("() => window.cmView.ids")
    click_position(page, ids.index(int(true_id)), ids.index(int(pred_id)))


def click_position(page, row: int, col: int) -> None:
    """Click the centre of the explorer heatmap's cell at (row, col) of the view shown."""
    page.mouse.click(*cell_centre(page, row, col))


# Scrolls the page so that the explorer heatmap's cell (r, c) sits mid-viewport, then says where it is
# (viewport coordinates). The 100-class heatmap is taller than the viewport: scrolling the plot alone into
# view leaves its first and last rows off screen, and a mouse event there reaches nothing.
SCROLL_TO_CELL = """([r, c]) => { const gd = document.getElementById('confusion-matrix');
    const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
    const at = () => { const box = gd.getBoundingClientRect();
                       return [box.left + xa._offset + xa.l2p(c), box.top + ya._offset + ya.l2p(r)]; };
    const [x, y] = at();
    window.scrollBy(x - window.innerWidth / 2, y - window.innerHeight / 2);
    return at(); }"""


def cell_centre(page, row: int, col: int) -> tuple[float, float]:
    """Where the explorer heatmap's cell (row, col) is on screen, scrolled to the middle of the viewport.
    The square heatmap sits inside a wider plot area, so the cell is placed through Plotly's own axes."""
    x, y = page.evaluate(SCROLL_TO_CELL, [row, col])
    size = page.viewport_size
    assert 0 <= x < size["width"] and 0 <= y < size["height"], f"cell ({row}, {col}) at {(x, y)} is off screen"
    return x, y


def screenshot_report(index_html: Path, png: Path, width: int = 1400, height: int = 1700,
                      full_page: bool = False, page=None) -> Path:
    """Screenshot of the report page as a reader sees it (the top `height` pixels, or the whole page
    with full_page=True), after the interactive plots have rendered. Launches its own Chromium
    unless given an open Playwright `page`. Returns the PNG's path."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    if page is None:
        with browser_page(width, height) as (own, problems):
            screenshot_report(index_html, png, width, height, full_page, page=own)
        if problems:
            raise RuntimeError(f"{index_html} logged errors while rendering: {problems}")
        return png
    page.set_viewport_size({"width": width, "height": height})
    open_page(page, index_html)
    page.screenshot(path=str(png), full_page=full_page)
    return png


def main(argv: Optional[list[str]] = None) -> None:
    import argparse
    parser = argparse.ArgumentParser(description="Screenshot a generated index.html with headless Chromium.")
    parser.add_argument("index_html", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1700)
    parser.add_argument("--full-page", action="store_true")
    args = parser.parse_args(argv)
    print(screenshot_report(args.index_html, args.png, args.width, args.height, args.full_page))


if __name__ == "__main__":
    main()
