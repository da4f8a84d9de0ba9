"""Nothing is lost and no two runs mix when a run dies: `python -m helpers analyze` is killed with SIGKILL over a
complete earlier run, in the middle of the class galleries and (hypothesis) at random points. The folder then
holds the earlier run exactly as it was (the new run's outputs were still in its hidden staging folder), or,
killed while they were being moved into place, the next run completes the move: wholly the old run or wholly
the new one, and index.html never describes files another run wrote. Temporary files are hidden and never
linked, and the next complete run removes them and the dead run's staging folder, and says so."""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers.config import Params
from helpers.files import atomic
from helpers.files.outputs import Outputs
from helpers.pipeline import Analysis

from conftest import REPO, TINY_ARCH, run_params
from output_checks import check_outputs, parse_html

# helpers.files.atomic.atomic_path names a temporary file ".<final name>.gradcam_<host>_<pid>_<random>.tmp<final suffix>"
# next to its target (atomic.TEMP_NAME is the exact form; this is the looser one the test has always checked).
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp(\.[A-Za-z0-9]+)?$")
N_NEW_BEFORE_KILL = 8


def params(cifar_root, ckpt, out, **kw) -> Params:
    return run_params(cifar_root, ckpt, out, **{"EMBEDDING": "tsne", **kw})


def visible_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out).parts)}


def temp_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file() and ".tmp" in p.name)


def check_every_file_is_complete(out: Path) -> None:
    for rel in visible_files(out):
        path = out / rel
        if path.suffix == ".png":
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                im.load()
        elif path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh))
            assert rows and rows[0] and len({len(r) for r in rows}) == 1, rel  # a header, equal-length rows
        elif path.suffix == ".html":
            parse_html(path)
            assert path.read_text(encoding="utf-8").rstrip().endswith("</html>"), rel
        elif path.suffix == ".txt":
            assert path.read_text(encoding="utf-8").strip(), rel
    manifest = out / ".manifest.json"
    assert all((out / rel).is_file() for rel in json.loads(manifest.read_text(encoding="utf-8")))
    for cache in (out / ".cache").glob("*.npz"):
        with np.load(cache, allow_pickle=False) as z:
            [z[k] for k in z.files]


def staged_galleries(out: Path) -> list[Path]:
    """The class galleries a run has written so far into its staging folder."""
    return list(out.glob(".gradcam-run-*/worst_predictions/class_*.png"))


def kill_during_galleries(cmd: list[str], out: Path, log: Path) -> tuple[int, int, int]:
    """Start `cmd`, SIGKILL it once it has written N_NEW_BEFORE_KILL class galleries (into its staging folder).
    Returns (its exit status, how many galleries it had written by then, its process id)."""
    start = time.time()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    new = 0
    try:
        deadline = start + 300
        while proc.poll() is None and time.time() < deadline:
            new = len(staged_galleries(out))
            if new >= N_NEW_BEFORE_KILL:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and new < N_NEW_BEFORE_KILL:
            proc.kill()
        proc.wait(timeout=60)
    return proc.returncode, new, proc.pid


def test_sigkill_mid_run_loses_nothing(cifar_root, tiny_checkpoint, tmp_path):
    out = tmp_path / "gradcam_results"
    Analysis(params(cifar_root, tiny_checkpoint, out), progress=False).run_all()   # a complete earlier run
    before = visible_files(out)
    n_galleries = len(list((out / "worst_predictions").glob("class_*.png")))

    # The same analysis with Grad-CAM++ instead of Grad-CAM: every gallery changes.
    cmd = [sys.executable, "-m", "helpers", "analyze", "--quiet", "--model-path", str(tiny_checkpoint),
           "--arch", TINY_ARCH, "--data-root", str(cifar_root), "--no-download", "--output-dir", str(out),
           "--embedding", "tsne", "--device", "cpu", "--cam-method", "gradcam++"]
    status, replaced, pid = kill_during_galleries(cmd, out, tmp_path / "killed.log")
    assert status == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert N_NEW_BEFORE_KILL <= replaced < n_galleries  # killed in the middle of the galleries

    # The folder is the earlier run, byte for byte; the killed run's galleries stayed in its staging folder.
    assert visible_files(out) == before
    assert len(staged_galleries(out)) >= N_NEW_BEFORE_KILL
    check_every_file_is_complete(out)

    # Temporary files are hidden, named after their target, and nothing points at them.
    # as a kill mid-write leaves it: the suite's mark, this host and the killed run's process id
    orphan = out / "worst_predictions" / f".class_000_apple.png.gradcam_{atomic.HOST}_{pid}_k1ll3d00.tmp.png"
    orphan.write_bytes(before["worst_predictions/class_000_apple.png"][:100])
    index = (out / "index.html").read_text(encoding="utf-8") + (out / ".manifest.json").read_text(encoding="utf-8")
    for tmp in [t for t in temp_files(out) if not t.relative_to(out).parts[0].startswith(".gradcam-run-")]:
        match = TEMP_NAME.match(tmp.name)   # (the dead run's staging folder is discarded whole, below)
        assert match, f"temporary file not hidden/named after its target: {tmp}"
        assert (tmp.parent / match["target"]).is_file()
        assert tmp.name not in index

    # The next complete run replaces everything, removes what the killed run left behind, and says so.
    again = Analysis(params(cifar_root, tiny_checkpoint, out, CAM_METHOD="gradcam++"), progress=False)
    again.run_all()
    check_outputs(out, num_classes=100, n_pair_galleries=5)   # includes: no *.tmp* files left
    assert not temp_files(out) and not list(out.glob(".gradcam-run-*"))
    assert any("stopped before it finished" in note for note in again.results["report"].notes)


# ----------------------------------------------------------------------------- the PNG encoder

def test_png_bytes_decode_to_the_same_pixels_with_pillow_and_matplotlib(tmp_path):
    """png.png_bytes writes PNG itself (Up filter + zlib); two independent decoders must read back
    exactly the pixels, for every mode it takes, odd sizes and a 1x1 image."""
    import matplotlib.image as mpimg

    from helpers.files.png import png_bytes, save_png
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (5, 7, 3), (6, 4, 4), (1, 1, 3), (33, 17, 3), (2, 300, 3)]:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        path = tmp_path / f"p{'x'.join(map(str, shape))}.png"
        path.write_bytes(png_bytes(pixels))
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (shape[1], shape[0])
            assert np.array_equal(np.asarray(im), pixels), shape
        via_mpl = mpimg.imread(path)   # floats in [0, 1]
        assert np.array_equal(np.round(via_mpl * 255).astype(np.uint8), pixels), shape
    # save_png: PIL images of the fast modes go through png_bytes, other modes through Pillow
    rgb = Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8))
    save_png(rgb, tmp_path / "rgb.png")
    with Image.open(tmp_path / "rgb.png") as im:
        assert np.array_equal(np.asarray(im), np.asarray(rgb))
    pal = rgb.convert("P")
    save_png(pal, tmp_path / "pal.png")
    with Image.open(tmp_path / "pal.png") as im:
        assert im.mode == "P" and np.array_equal(np.asarray(im.convert("RGB")), np.asarray(pal.convert("RGB")))
    for bad in (np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros(4, np.uint8)):
        with pytest.raises(ValueError, match="png_bytes needs uint8"):
            png_bytes(bad)


@pytest.mark.parametrize("deflate", ["isal", "zlib"])
def test_png_bytes_with_either_deflate_backend(tmp_path, monkeypatch, deflate):
    """ISA-L (when installed) and the standard library's zlib both write PNGs that Pillow reads back to the
    same pixels; the pHYs chunk carries the dpi."""
    from helpers.files import png
    if deflate == "isal":
        pytest.importorskip("isal")
    else:
        monkeypatch.setitem(sys.modules, "isal", None)   # `from isal import ...` now raises ImportError
    pixels = np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    pixels[10:30] = pixels[10]                              # compressible rows, as in real pictures
    for level in (0, 1, 3, 6):
        data = png.png_bytes(pixels, level=level, dpi=100)
        with Image.open(io.BytesIO(data)) as im:
            assert np.array_equal(np.asarray(im), pixels), (deflate, level)
            assert im.info["dpi"] == pytest.approx((100, 100), abs=1e-3)


def _savefig_bytes(fig, **kwargs) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kwargs)
    return buf.getvalue()


def test_save_figure_writes_the_same_pixels_as_matplotlib(tmp_path):
    """save_figure saves through matplotlib's own savefig at the fast zlib level: the pixels must be those of a
    plain savefig, with bbox_inches="tight", a constrained layout and a transparent facecolor alike, and the
    file is the one savefig writes at PNG_COMPRESS_LEVEL."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from helpers.files.png import PNG_COMPRESS_LEVEL, save_figure
    cases = {"tight": {"bbox_inches": "tight"}, "plain": {}, "transparent": {"transparent": True}}
    for name, kwargs in cases.items():
        fig, ax = plt.subplots(figsize=(3, 2), layout="constrained" if name == "plain" else None)
        ax.imshow(np.arange(12).reshape(3, 4), cmap="viridis")
        ax.set_title("a title with text", fontsize=9)
        ours, reference = tmp_path / f"{name}_ours.png", tmp_path / f"{name}_mpl.png"
        save_figure(fig, ours, dpi=72, **kwargs)
        fig.savefig(reference, dpi=72, format="png", **kwargs)
        with Image.open(ours) as a, Image.open(reference) as b:
            assert a.size == b.size and a.mode == b.mode == "RGBA", name
            assert np.array_equal(np.asarray(a), np.asarray(b)), name
        assert ours.read_bytes() == _savefig_bytes(fig, dpi=72, pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL},
                                                   **kwargs), name
        plt.close(fig)


# ----------------------------------------------------------------------------- killed anywhere (hypothesis)

@pytest.fixture(scope="module")
def earlier_complete_run(cifar_root, tiny_checkpoint, tmp_path_factory):
    """A complete Grad-CAM run, and how long the same analysis takes from the command line."""
    out = tmp_path_factory.mktemp("earlier") / "gradcam_results"
    start = time.perf_counter()
    subprocess.run(analyze_cmd(cifar_root, tiny_checkpoint, out, "gradcam"), cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    return out, time.perf_counter() - start


def analyze_cmd(cifar_root, ckpt, out: Path, method: str) -> list[str]:
    return [sys.executable, "-m", "helpers", "analyze", "--quiet", "--model-path", str(ckpt), "--arch", TINY_ARCH,
            "--data-root", str(cifar_root), "--no-download", "--output-dir", str(out), "--embedding", "tsne",
            "--device", "cpu", "--cam-method", method]


def page_links(page: str) -> set[str]:
    """The href and src of the page's elements (not text inside its scripts: index.html inlines plotly.js)."""
    from html.parser import HTMLParser
    found = set()

    class Links(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.update(v.split("#")[0] for k, v in attrs if k in ("href", "src") and v and not v.startswith("#"))
    Links().feed(page)
    return found


def one_run(out: Path, before: dict[str, bytes]) -> str:
    """"old" when the folder is the earlier run byte for byte, "new" when it is wholly the new run (its manifest
    lists exactly the visible files, its summary is the new CAM method's, and its index links only those)."""
    visible = visible_files(out)
    if visible == before:
        return "old"
    listed = set(json.loads((out / ".manifest.json").read_text(encoding="utf-8")))
    assert set(visible) <= listed | {"plotly.min.js"} and "index.html" in visible, sorted(set(visible) - listed)
    assert "gradcam++" in visible["analysis_summary.txt"].decode()
    index = visible["index.html"].decode()
    linked = page_links(index)
    assert {rel for rel in linked if not rel.startswith(("http", "data:"))} <= set(visible), "index links another run"
    check_every_file_is_complete(out)
    return "new"


@settings(max_examples=3, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(fraction=st.floats(min_value=0.05, max_value=1.1))
def test_a_run_killed_at_any_point_leaves_one_run(earlier_complete_run, cifar_root, tiny_checkpoint, tmp_path,
                                                 fraction):
    earlier, duration = earlier_complete_run
    out = tmp_path / f"killed_{fraction:.3f}" / "gradcam_results"
    shutil.copytree(earlier, out, symlinks=True)
    before = visible_files(out)
    proc = subprocess.Popen(analyze_cmd(cifar_root, tiny_checkpoint, out, "gradcam++"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=fraction * duration)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    # Right after the kill: index.html (when there is one) describes only this folder's files of one run.
    if not (out / ".gradcam-commit.json").exists():
        one_run(out, before)
    # Whatever the next run finds, it first makes the folder one run again (finishing or discarding the dead one).
    Outputs(out)
    assert one_run(out, before) in ("old", "new")
    assert not list(out.glob(".gradcam-run-*")) and not (out / ".gradcam-commit.json").exists()
