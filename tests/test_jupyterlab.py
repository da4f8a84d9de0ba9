"""The notebook in a real JupyterLab, driven through Debian's Chromium as a new user runs it.

A throwaway `jupyter lab` (this venv's, kernel = this venv's python) serves a temp folder holding a copy of
GradCAM_Analysis.ipynb and a link to helpers/; GRADCAM_* environment variables point the run at the small
generated CIFAR-100 set and the tiny checkpoint. Through the UI: Kernel → Restart Kernel and Run All Cells…,
no traceback anywhere, the class explorer reacts to its Class dropdown, and the report (OUTPUT_DIR/index.html)
works both in JupyterLab's HTML viewer (sandboxed iframe, after "Trust HTML") and opened in a new browser tab
(/files/...). Run with -s to see the measured times.
"""
from __future__ import annotations

import csv
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from browser import CHROMIUM, SCROLL_TO_CELL, browser_page
from conftest import REPO, TINY_ARCH
from jupyterlab_server import children, jupyterlab_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} missing (apt-get install chromium)"),
]

NOTEBOOK = "GradCAM_Analysis.ipynb"
OUTPUT_DIR = "gradcam_results"          # relative to the server's root dir (the kernel's working directory)
RUN_ALL_TIMEOUT_MS = 240_000
FIGURE_TIMEOUT_MS = 30_000

# Every code cell shows an execution count ("[12]:", not "[ ]:" or "[*]:").
ALL_CELLS_RAN = """() => {
  const p = [...document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim());
  return p.length > 0 && p.every(t => /^\\[\\d+\\]:$/.test(t));
}"""
KERNEL_IDLE = """() => [...document.querySelectorAll('.jp-StatusBar-TextItem')].some(e => / \\| Idle$/.test(e.textContent))
  && !!document.querySelector('.jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status="idle"]')"""
# Tracebacks: in JupyterLab 4 an error output (an uncaught exception) and a traceback printed to stderr both
# render as this mime type (checked by running a notebook with `raise ValueError` and traceback.print_exc()).
TRACEBACKS = """() => [...document.querySelectorAll(
    '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
  .map(e => e.textContent).filter(t => /Traceback|Error\\b/.test(t))"""
FIRST_FIGURE = ".js-plotly-plot .main-svg"
IMAGES = "() => [...document.images].map(i => ({src: i.src.slice(0, 120), ok: i.complete && i.naturalWidth > 0}))"
IMAGES_SETTLED = "() => [...document.images].every(i => i.complete)"


@dataclass
class Notebook:
    page: object
    problems: list
    root: Path
    run_all_s: float
    times: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def lab_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lab_root")
    shutil.copy(REPO / NOTEBOOK, root / NOTEBOOK)
    (root / "helpers").symlink_to(REPO / "helpers", target_is_directory=True)
    return root


# JUPYTERLAB_TEST_IMAGES=2000 (with the real ResNet-56 in TORCH_HOME): the same test on that many generated
# images with the default model and galleries, for the Run All time a user sees (`-s` prints it).
MEASURE_IMAGES = int(os.environ.get("JUPYTERLAB_TEST_IMAGES", "0"))


@pytest.fixture(scope="module")
def lab(lab_root, cifar_root, tiny_checkpoint, torch_home, tmp_path_factory):
    if MEASURE_IMAGES:
        from helpers.data.synthetic import write_cifar100
        data = write_cifar100(tmp_path_factory.mktemp("measure"), n_test=MEASURE_IMAGES, n_train=10, seed=0).parent
        env = {"GRADCAM_DATA_ROOT": str(data), "GRADCAM_DOWNLOAD": "false", "GRADCAM_OUTPUT_DIR": OUTPUT_DIR,
               "GRADCAM_DEVICE": "cpu", "GRADCAM_EMBEDDING": "tsne", "TORCH_HOME": os.environ["TORCH_HOME"],
               "MPLBACKEND": "Agg"}
        with jupyterlab_server(lab_root, env=env) as server:
            yield server
        return
    env = {"GRADCAM_MODEL_PATH": str(tiny_checkpoint), "GRADCAM_ARCH": TINY_ARCH,
           "GRADCAM_DATA_ROOT": str(cifar_root), "GRADCAM_DOWNLOAD": "false", "GRADCAM_OUTPUT_DIR": OUTPUT_DIR,
           "GRADCAM_DEVICE": "cpu", "GRADCAM_EMBEDDING": "tsne", "GRADCAM_N_PAIR_GALLERIES": "2",
           "GRADCAM_N_WORST": "3", "GRADCAM_N_BEST": "2", "GRADCAM_PAIR_EXAMPLES": "3",
           "TORCH_HOME": str(torch_home), "MPLBACKEND": "Agg"}
    with jupyterlab_server(lab_root, env=env) as server:
        yield server


@pytest.fixture(scope="module")
def chromium():
    with browser_page(1400, 1000) as (page, problems):
        yield page, problems


@pytest.fixture(scope="module")
def notebook(lab, chromium, lab_root) -> Notebook:
    """The notebook opened in JupyterLab and run through Kernel → Restart Kernel and Run All Cells…"""
    page, problems = chromium
    page.goto(lab.url(f"lab/tree/{NOTEBOOK}"))
    page.locator(".jp-NotebookPanel .jp-Notebook").wait_for(timeout=60_000)
    page.wait_for_function(KERNEL_IDLE, timeout=60_000)   # a restart asked before the kernel is up is dropped
    page.locator(".lm-MenuBar-item", has_text="Kernel").click()
    page.locator('.lm-Menu-item[data-command="runmenu:restart-and-run-all"]',
                 has_text="Restart Kernel and Run All Cells").click()
    dialog = page.locator(".jp-Dialog")
    dialog.wait_for(timeout=10_000)
    assert "Restart Kernel?" in dialog.inner_text()
    start = time.monotonic()
    dialog.locator("button.jp-mod-accept", has_text="Restart").click()
    # the counts go back to "[ ]:" / "[*]:" first; then wait for every cell to have run, and an idle kernel
    page.wait_for_function("() => !(" + ALL_CELLS_RAN + ")()", timeout=30_000)
    page.wait_for_function(f"() => ({ALL_CELLS_RAN})() && ({KERNEL_IDLE})()", timeout=RUN_ALL_TIMEOUT_MS,
                           polling=500)
    run_all = time.monotonic() - start
    print(f"\n[jupyterlab] Restart Kernel and Run All Cells: {run_all:.1f} s")
    return Notebook(page, problems, lab_root, run_all)


def kernel_argv(server_pid: int) -> list[list[str]]:
    """Command lines of the ipykernel processes the server started."""
    found = []
    for pid in children(server_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "ipykernel_launcher" in argv:
            found.append(argv)
    return found


def test_run_all_executes_every_cell_in_this_venvs_kernel(notebook, lab):
    page = notebook.page
    assert page.evaluate(ALL_CELLS_RAN)
    kernels = kernel_argv(lab.process.pid)
    assert kernels and all(argv[0] == sys.executable for argv in kernels), kernels
    stdout = "\n".join(page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stdout"]')
                       .all_text_contents())
    assert f"outputs go to {(notebook.root / OUTPUT_DIR).resolve()}" in stdout   # GRADCAM_OUTPUT_DIR reached it
    assert "Overall accuracy" in stdout
    assert (notebook.root / OUTPUT_DIR / "index.html").is_file()


def test_no_cell_output_holds_a_traceback(notebook):
    page = notebook.page
    assert page.evaluate(TRACEBACKS) == []
    # the class explorer's view is there (ipywidgets rendered, not "Loading widget...")
    assert page.locator(".jp-NotebookPanel .widget-dropdown label", has_text="Class:").count() == 1


def test_class_dropdown_changes_the_explorer_view(notebook):
    page = notebook.page
    dropdown = page.locator(".widget-dropdown", has=page.locator("label", has_text="Class:")).locator("select")
    header = page.locator(".jp-OutputArea-output .widget-html-content h3").first
    header.scroll_into_view_if_needed()
    before = header.text_content()
    gallery = page.locator(".jp-OutputArea-output .widget-html-content img.gallery")
    src_before = gallery.first.get_attribute("src") if gallery.count() else None
    options = dropdown.locator("option")
    current = dropdown.evaluate("s => s.selectedIndex")
    # the next class that has test images of its own and a gallery (its accuracy label is not "nan%")
    labels = options.all_text_contents()
    target = next(i for i in list(range(current + 1, len(labels))) + list(range(current))
                  if "nan" not in labels[i])
    label = labels[target].replace("\xa0", " ")
    code, name = label.split(" (")[0].split(": ", 1)
    start = time.monotonic()
    dropdown.select_option(index=target)
    page.wait_for_function("want => [...document.querySelectorAll('.widget-html-content h3')]"
                           ".some(h => h.textContent === want)", arg=f"{code}: {name}", timeout=60_000)
    elapsed = time.monotonic() - start
    print(f"\n[jupyterlab] class explorer: {before!r} -> {header.text_content()!r} in {elapsed:.2f} s")
    assert header.text_content() != before
    if src_before is not None:
        gallery.first.wait_for(timeout=30_000)
        assert gallery.first.get_attribute("src") != src_before


# ---------------------------------------------------------------------------------------------- the report
def _top_pair(out: Path) -> dict:
    with open(out / "most_confused_pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows, "most_confused_pairs.csv is empty"
    return rows[0]


def _blocked_requests(lab) -> list[str]:
    return [line for line in lab.log_tail(200_000).splitlines() if "Blocking request" in line or " 403 " in line]


def _check_report(frame, problems, lab, where: str, start: float, times: dict):
    """In `frame` (a page or an iframe): the Plotly figures drew and every <img> decoded."""
    try:
        frame.locator(FIRST_FIGURE).first.wait_for(state="attached", timeout=FIGURE_TIMEOUT_MS)
    except Exception as exc:   # playwright TimeoutError; say why, with what the browser and the server saw
        blocked = _blocked_requests(lab)
        pytest.fail(f"{where}: no Plotly figure ({FIRST_FIGURE}) after {FIGURE_TIMEOUT_MS / 1000:.0f} s "
                    f"({type(exc).__name__}). Browser errors: {problems[-8:]}. Server refused: {blocked[-8:]}",
                    pytrace=False)
    times[where] = time.monotonic() - start
    print(f"\n[jupyterlab] {where}: first Plotly figure {times[where]:.2f} s after navigation")
    assert not [p for p in problems if "Plotly is not defined" in p], problems
    assert frame.evaluate("() => typeof window.Plotly") == "object"
    try:
        frame.wait_for_function(IMAGES_SETTLED, timeout=FIGURE_TIMEOUT_MS)
    except Exception:
        pass
    images = frame.evaluate(IMAGES)
    broken = [i["src"] for i in images if not i["ok"]]
    assert images and not broken, (f"{where}: {len(broken)} of {len(images)} <img> did not decode: {broken[:5]}; "
                                   f"server refused: {_blocked_requests(lab)[-5:]}")


def _click_top_confusion(frame, problems, out: Path, where: str):
    """Click the confusion-matrix cell of the top confused pair; its images appear in #cell-images."""
    top = _top_pair(out)
    try:   # the page has loaded already (the figure tests waited for it): no long wait here
        frame.locator("#confusion-matrix .nsewdrag").first.wait_for(timeout=10_000)
    except Exception as exc:
        pytest.fail(f"{where}: the confusion-matrix heatmap (#confusion-matrix .nsewdrag) is not drawn "
                    f"({type(exc).__name__}); browser errors: {problems[-5:]}", pytrace=False)
    ids = frame.evaluate("() => window.cmView && window.cmView.ids")
    assert ids, f"{where}: window.cmView.ids is missing"
    pos = {int(c): k for k, c in enumerate(ids)}
    r, c, n = pos[int(top["true_id"])], pos[int(top["pred_id"])], len(ids)
    frame.evaluate(SCROLL_TO_CELL, [r, c])   # rows near the edge of a tall heatmap are off screen otherwise
    box = frame.locator("#confusion-matrix .nsewdrag").first.bounding_box()   # page coordinates, iframe or not
    frame_page = frame.page if hasattr(frame, "page") else frame
    frame_page.mouse.click(box["x"] + (c + 0.5) * box["width"] / n, box["y"] + (r + 0.5) * box["height"] / n)
    title = frame.locator("#cell-images .cell-title")
    title.wait_for(timeout=10_000)
    assert f"{top['true_name']} → {top['pred_name']}" in title.text_content()
    tiles = frame.locator("#cell-images canvas.cell-tile")
    assert tiles.count() >= 1
    frame.wait_for_function("() => [...document.querySelectorAll('#cell-images canvas.cell-tile')]"
                            ".every(c => c.getAttribute('data-drawn') === '1')", timeout=10_000)


@pytest.fixture(scope="module")
def html_viewer(notebook, lab):
    """index.html opened from JupyterLab's file browser (double-click the folder, then the file), then trusted."""
    page, problems = notebook.page, notebook.problems
    page.locator(".jp-DirListing-item", has_text=OUTPUT_DIR).first.dblclick()
    item = page.locator(".jp-DirListing-item .jp-DirListing-itemText", has_text="index.html").first
    item.wait_for(timeout=10_000)
    item.dblclick()
    iframe = page.locator(".jp-HTMLViewer iframe")
    iframe.wait_for(timeout=30_000)
    trust = page.locator('.jp-MainAreaWidget:not(.lm-mod-hidden) jp-button[aria-label="Trust HTML"]')
    del problems[:]   # the untrusted load's "Blocked script execution" errors; keep only the trusted load's
    trust.click()
    start = time.monotonic()
    page.wait_for_function("() => (document.querySelector('.jp-HTMLViewer iframe').getAttribute('sandbox') || '')"
                           ".includes('allow-scripts')", timeout=10_000)
    frame = iframe.element_handle().content_frame()
    frame.wait_for_load_state("load")
    return frame, start


@pytest.fixture(scope="module")
def new_tab(lab, chromium):
    """The same index.html as 'Open in New Browser Tab' opens it: /files/<path>?token=..."""
    page, _ = chromium
    tab = page.context.new_page()
    problems: list[str] = []
    tab.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    start = time.monotonic()
    tab.goto(lab.url(f"files/{OUTPUT_DIR}/index.html"), wait_until="commit")
    yield tab, problems, start
    tab.close()


def test_report_in_jupyterlab_html_viewer_draws_figures_and_images(html_viewer, notebook, lab):
    frame, start = html_viewer
    _check_report(frame, notebook.problems, lab, "HTML viewer (trusted)", start, notebook.times)


def test_report_in_new_browser_tab_draws_figures_and_images(new_tab, notebook, lab):
    tab, problems, start = new_tab
    _check_report(tab, problems, lab, "new browser tab (/files/)", start, notebook.times)


def test_clicking_a_confusion_cell_shows_its_images_in_the_html_viewer(html_viewer, notebook):
    frame, _ = html_viewer
    _click_top_confusion(frame, notebook.problems, notebook.root / OUTPUT_DIR, "HTML viewer")


def test_clicking_a_confusion_cell_shows_its_images_in_a_new_tab(new_tab, notebook):
    tab, problems, _ = new_tab
    _click_top_confusion(tab, problems, notebook.root / OUTPUT_DIR, "new browser tab")
