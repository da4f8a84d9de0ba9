"""Inputs that try to run code, reach the network or inject markup, end to end (issue section 1, Security).

In the style of test_errors.py: each case goes through the entry point a user calls (the notebook's `Analysis`,
`helpers.compare.compare`, `python -m helpers`), asserts the error type and the message's key words, and that
nothing outside OUTPUT_DIR changed (a snapshot of every other file the run could reach: the test's folder, which
is also the working directory, and the data).
"""
from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from helpers.compare import compare
from helpers.errors import CheckpointError, ConfigError, SuiteError
from helpers.model.checkpoint import is_torchscript_file, read_checkpoint
from helpers.model.load import load_model
from helpers.pipeline import Analysis
from helpers.plots import interactive

from conftest import REPO, run_params
from tiny_model import TinyNet

LIMIT = 60
SENTINEL_BYTES = b"\0" * 16
LINK = '<a href="https://evil.example/x">cat</a>'


# ------------------------------------------------------------------------------------------------ helpers
class FileWriter(nn.Module):
    """A classifier whose forward writes 88s into `path` through torch.from_file(shared=True): once scripted, the
    archive carries this code, and whoever runs its forward (a probe pass included) overwrites the file."""

    def __init__(self, path: str, num_classes: int = 100):
        super().__init__()
        self.path = path
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x):
        written = torch.from_file(self.path, shared=True, size=16, dtype=torch.uint8).fill_(88)
        return self.fc(x.mean(dim=(2, 3))) + written[0].float() * 0   # used, so TorchScript keeps the write


def file_writing_torchscript(target: Path, where: Path, trace: bool = False) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch.jit is deprecated, not gone
        model = FileWriter(str(target)).eval()
        scripted = torch.jit.trace(model, torch.zeros(1, 3, 8, 8)) if trace else torch.jit.script(model)
    target.write_bytes(SENTINEL_BYTES)   # tracing ran forward once
    scripted.save(str(where))
    return where


def snapshot(*roots: Path, skip: Optional[Path] = None) -> dict:
    """Every file under `roots` (except under `skip`, the OUTPUT_DIR): path -> sha256 of its bytes."""
    files = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if skip is not None and (path == skip or skip in path.parents):
                continue
            if path.is_file():
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_dir():
                files[str(path)] = "dir"
    return files


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_sec") / "tiny.pt"
    torch.save({"state_dict": TinyNet(num_classes=100).state_dict()}, path)
    return path


class World:
    """The test's folder (also the working directory), a sentinel file outside OUTPUT_DIR, and the snapshot."""

    def __init__(self, tmp: Path, cifar_root: Path, tiny: Path, monkeypatch):
        self.tmp, self.cifar_root, self.tiny = tmp, cifar_root, tiny
        self.out = tmp / "out"
        self.sentinel = tmp / "outside" / "sentinel.bin"
        self.sentinel.parent.mkdir()
        self.sentinel.write_bytes(SENTINEL_BYTES)
        (tmp / "cwd").mkdir()
        monkeypatch.chdir(tmp / "cwd")
        self.before: dict = {}

    def params(self, **kw):
        return run_params(self.cifar_root, self.tiny, self.out, **{"EMBEDDING": "tsne", "LIMIT": LIMIT, **kw})

    def analysis(self, **kw) -> Analysis:
        return Analysis(self.params(**kw), progress=False)

    def evil(self, name: str = "scripted.pt", trace: bool = False) -> Path:
        path = file_writing_torchscript(self.sentinel, self.tmp / name, trace)
        self.before = snapshot(self.tmp, self.cifar_root, skip=self.out)
        return path

    def freeze(self) -> None:
        self.before = snapshot(self.tmp, self.cifar_root, skip=self.out)

    def assert_untouched(self) -> None:
        assert self.sentinel.read_bytes() == SENTINEL_BYTES, "the TorchScript file's code ran"
        assert snapshot(self.tmp, self.cifar_root, skip=self.out) == self.before, "a file outside OUTPUT_DIR changed"


@pytest.fixture
def world(tmp_path, cifar_root, tiny_sd, monkeypatch) -> World:
    return World(tmp_path, cifar_root, tiny_sd, monkeypatch)


def raises(error: type, action, *fragments: str) -> str:
    with pytest.raises(SuiteError) as err:
        action()
    assert type(err.value) is error, f"{type(err.value).__name__}: {err.value}"
    message = str(err.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message lacks {missing}:\n{message}"
    return message


TORCHSCRIPT_WORDS = ("TorchScript archive", "refused before anything in it was read", "ALLOW_UNSAFE_PICKLE = True",
                     "CAMs cannot be computed", "torch.save(model.state_dict(), 'weights.pt')")


# ------------------------------------------------------------------------------------------------ TorchScript
def test_the_file_writing_torchscript_really_writes_when_run(tmp_path):
    """The payload works: loaded and run the way the probe pass did, it overwrites the target."""
    target = tmp_path / "canary.bin"
    path = file_writing_torchscript(target, tmp_path / "canary.pt")
    assert is_torchscript_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(str(path))(torch.zeros(1, 3, 32, 32))
    assert target.read_bytes() == b"X" * 16


@pytest.mark.parametrize("name, arch, trace", [
    ("scripted.pt", None, False),            # the report: no ARCH, no opt-in
    ("traced.pth", None, True),
    ("with_arch.pt", "resnet20", False),     # an ARCH does not make the archive weights
    ("weights.safetensors", None, False),    # recognised by its format, not its suffix
    ("no_suffix", None, False),
])
def test_torchscript_model_path_is_refused_before_its_code_runs(world, name, arch, trace):
    path = world.evil(name, trace)
    an = world.analysis(MODEL_PATH=str(path), ARCH=arch)
    raises(CheckpointError, an.run_all, f"The checkpoint {path} is a TorchScript archive", *TORCHSCRIPT_WORDS)
    world.assert_untouched()
    assert not list(world.out.rglob("*.png")) and not list(world.out.rglob("*.html"))


def test_every_reader_refuses_torchscript_without_the_opt_in(world):
    path = world.evil()
    raises(CheckpointError, lambda: read_checkpoint(path), "TorchScript archive", "ALLOW_UNSAFE_PICKLE")
    raises(CheckpointError, lambda: read_checkpoint(path, allow_unsafe_pickle=True), "TorchScript archive")
    raises(CheckpointError, lambda: load_model(path, num_classes=100), *TORCHSCRIPT_WORDS)
    raises(CheckpointError, lambda: load_model(path, arch="resnet20", num_classes=100), "ALLOW_UNSAFE_PICKLE")
    world.assert_untouched()


def test_torchscript_missed_by_the_format_check_is_still_never_run(world, monkeypatch):
    """Defence in depth: were is_torchscript_file to miss an archive, torch.load(weights_only=True) refuses it,
    even with the opt-in (which then only reaches torch.load, never torch.jit.load)."""
    from helpers.model import checkpoint, load
    path = world.evil()
    monkeypatch.setattr(checkpoint, "is_torchscript_file", lambda p: False)
    monkeypatch.setattr(load, "is_torchscript_file", lambda p: False)
    raises(CheckpointError, lambda: load_model(path, num_classes=100), "TorchScript archive", "ALLOW_UNSAFE_PICKLE")
    raises(CheckpointError, lambda: load_model(path, num_classes=100, allow_unsafe_pickle=True), "corrupt")
    world.assert_untouched()


def test_torchscript_as_checkpoint_b_of_compare_is_refused(world):
    path = world.evil()
    raises(CheckpointError, lambda: compare(world.params(), path, n_examples=2, progress=False),
           f"The checkpoint {path} is a TorchScript archive", *TORCHSCRIPT_WORDS)
    world.assert_untouched()
    assert not (world.out / "compare").exists() or not list((world.out / "compare").rglob("*.html"))


def test_cli_analyze_refuses_torchscript_without_a_traceback(world):
    path = world.evil()
    cmd = [sys.executable, "-m", "helpers", "analyze", "--quiet", "--model-path", str(path),
           "--data-root", str(world.cifar_root), "--no-download", "--output-dir", str(world.out),
           "--device", "cpu", "--limit", str(LIMIT)]
    run = subprocess.run(cmd, cwd=world.tmp / "cwd", capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout
    assert "TorchScript archive" in run.stderr and "ALLOW_UNSAFE_PICKLE" in run.stderr
    world.assert_untouched()


def test_with_the_opt_in_torchscript_loads_as_before(world):
    """ALLOW_UNSAFE_PICKLE = True keeps today's behaviour: the file loads (its code runs: that is the opt-in),
    and the analysis then explains that CAMs need an eager model."""
    path = world.evil()
    loaded = load_model(path, num_classes=100, allow_unsafe_pickle=True)
    assert loaded.arch == "torchscript" and loaded.num_classes == 100
    assert world.sentinel.read_bytes() == b"X" * 16   # the probe ran it, as opted in


# ------------------------------------------------------------------------------------------------ class names in Plotly
MARKUP = [LINK, "<b>bold</b>", "line<br>break", "a & b < c"]


def _no_markup(texts) -> None:
    for text in texts:
        text = str(text)
        assert "<a" not in text and "<b>" not in text and "<br>" not in text and "< c" not in text, text


def test_per_class_chart_escapes_class_and_superclass_names():
    table = pd.DataFrame({"class_name": MARKUP, "accuracy": [0.1, 0.2, 0.3, 0.4],
                          "superclass": ['<a href="https://evil.example/s">pets</a>', "<i>x</i>", "g", "g"],
                          "support": [5] * 4, "correct": [1] * 4, "top_wrong_prediction": MARKUP[::-1],
                          "top_wrong_count": [1] * 4})
    fig = interactive.per_class_accuracy_figure(table)
    texts = list(fig.layout.xaxis.categoryarray)
    for trace in fig.data:
        texts += list(trace.x) + [trace.name]
        texts += [h.replace("<b>", "").replace("</b>", "").replace("<br>", "\n") for h in trace.hovertext]
    _no_markup(texts)
    assert any("&lt;i&gt;x&lt;/i&gt;" == t.name for t in fig.data)
    assert "&lt;a href=\"https://evil.example/x\"&gt;cat&lt;/a&gt;" in texts   # quotes stay: Plotly shows them
    page = interactive.per_class_accuracy_html(table, plotlyjs=None)
    assert 'href="https://evil' not in page and "<b>bold" not in page


def test_confusion_heatmap_escapes_categories_ticks_and_superclasses():
    n = len(MARKUP)
    cm = np.arange(n * n).reshape(n, n)
    row = cm / cm.sum(axis=1, keepdims=True) * 100
    fig = interactive.confusion_heatmap_figure(cm, row, MARKUP, list(range(n)),
                                               superclasses=["<b>s</b>", LINK, "t", "t"], spans=[(0, 2, 0)])
    axis_texts = list(fig.layout.xaxis.tickvals) + list(fig.layout.xaxis.ticktext) + list(fig.layout.yaxis.ticktext)
    _no_markup(list(fig.data[0].x) + list(fig.data[0].y) + axis_texts)
    assert fig.layout.xaxis.ticktext[0] == "&lt;a href=\"https://evil.example/x\"&gt;cat&lt;/a&gt;"
    assert fig.data[0].y[1].endswith("· &lt;a href=\"https://evil.example/x\"&gt;cat&lt;/a&gt;")
    page = interactive.confusion_heatmap_html(fig, plotlyjs=None)
    assert 'href="https://evil' not in page


def test_embedding_page_escapes_trace_names_and_hover_but_not_the_caption_text():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 4)
    page = interactive.embedding_html(rng.normal(size=(12, 2)), labels, labels[::-1], [0, 1, 2], MARKUP[:3], [],
                                      "t-SNE", "<b>note</b>", plotlyjs=None)
    assert 'href="https://evil' not in page and "<b>bold" not in page and "line<br>break" not in page
    assert "true: %{customdata[3]}" in page and "true: %{customdata[1]}" not in page
    # the side panel's caption is set with textContent: it gets the plain names (JSON-escaped in the page)
    assert "\\u003cb\\u003ebold" in page
    assert "&lt;b&gt;bold&lt;" in page   # the hover's and the legend's copy


def test_superclass_names_with_markup_are_drawn_as_text_end_to_end(world):
    """SUPERCLASS_MAP values are the user's own strings: they reach the heatmap and the per-class chart."""
    from helpers.data.datasets import load_dataset
    names = load_dataset("cifar100", root=world.cifar_root, download=False, limit=1).class_names
    mapping = {c: (LINK if i % 2 else "<b>even</b>") for i, c in enumerate(names)}
    world.freeze()
    an = world.analysis(SUPERCLASS_MAP=mapping)
    an.load_data()
    an.load_model()
    an.predict()
    conf = an.confusion()
    heat, bars = conf.heatmap, conf.per_class_figure
    _no_markup(list(heat.data[0].x) + list(heat.data[0].y) + [t.name for t in bars.data])
    for page in world.out.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert 'href="https://evil' not in text and "<b>even" not in text, page
    world.assert_untouched()


# ------------------------------------------------------------------------------------------------ timm hub and downloads
@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt is recorded and refused (so a test also proves the Hub was never asked)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.mark.parametrize("arch", ["timm:hf-hub:owner/name", "timm:hf_hub:owner/name", "timm:HF-HUB:timm/resnet18.a1_in1k"])
def test_timm_hub_names_are_refused_without_download(world, no_network, arch):
    world.freeze()
    an = world.analysis(ARCH=arch, DOWNLOAD=False)
    raises(ConfigError, an.load_model, f"ARCH='{arch}' names a model on the Hugging Face Hub", "DOWNLOAD is False",
           "Set DOWNLOAD = True", "timm registry name")
    assert no_network == []
    world.assert_untouched()


def test_timm_hub_unreachable_is_a_config_error(world, monkeypatch):
    pytest.importorskip("timm")
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)   # the Hub unreachable, without waiting on retries
    world.freeze()
    an = world.analysis(ARCH="timm:hf-hub:owner/name", DOWNLOAD=True)
    message = raises(ConfigError, an.load_model, "timm.create_model('hf-hub:owner/name')",
                     "could not fetch the model's config from the Hugging Face Hub", "Check the network")
    assert "LocalEntryNotFoundError" in message or "OfflineModeIsEnabled" in message or "Error" in message
    world.assert_untouched()


@pytest.mark.parametrize("exc", [OSError("disk"), KeyError("cfg"), ImportError("huggingface_hub"),
                                 FileNotFoundError("config.json")])
def test_every_timm_error_becomes_a_suite_error(world, monkeypatch, exc):
    timm = pytest.importorskip("timm")

    def broken(*args, **kwargs):
        raise exc

    monkeypatch.setattr(timm, "create_model", broken)
    world.freeze()
    an = world.analysis(ARCH="timm:resnet18")
    raises(ConfigError, an.load_model, "timm.create_model('resnet18')", "Check ARCH and MODEL_KWARGS")
    world.assert_untouched()


@pytest.mark.parametrize("arch, kwargs, key", [
    ("timm:resnet18", {"pretrained": True}, "pretrained"),
    ("timm:resnet18", {"checkpoint_path": "other.pth"}, "checkpoint_path"),
    ("torchvision:resnet18", {"weights": "DEFAULT"}, "weights"),
    ("vgg11", {"weights": "IMAGENET1K_V1"}, "weights"),   # a torchvision name without the prefix
])
def test_model_kwargs_cannot_ask_for_downloaded_or_other_weights(world, no_network, arch, kwargs, key):
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    world.freeze()
    an = world.analysis(ARCH=arch, MODEL_KWARGS=kwargs, DOWNLOAD=False)
    raises(ConfigError, an.load_model, f"MODEL_KWARGS {key}=", "the weights come from MODEL_PATH only",
           f"Remove '{key}' from MODEL_KWARGS")
    assert no_network == []
    world.assert_untouched()


def test_names_with_markup_are_drawn_as_literal_text_in_a_browser(tmp_path):
    """What a reader sees: Chromium draws the three pages; no <a> (link) or <b> element appears in any plot's SVG,
    and the tick labels, legend entries and hover read the names literally."""
    pytest.importorskip("playwright")
    from browser import CHROMIUM, browser_page, open_page
    if not CHROMIUM.exists():
        pytest.skip("no headless Chromium")
    from plotly.offline import get_plotlyjs
    (tmp_path / "plotly.min.js").write_text(get_plotlyjs(), encoding="utf-8")
    n = len(MARKUP)
    table = pd.DataFrame({"class_name": MARKUP, "accuracy": [0.1, 0.2, 0.3, 0.4],
                          "superclass": ["<b>pets</b>", LINK, "g", "g"]})
    cm = np.arange(n * n).reshape(n, n) + 1
    heat = interactive.confusion_heatmap_figure(cm, cm / cm.sum(axis=1, keepdims=True) * 100, MARKUP, list(range(n)),
                                                superclasses=["<b>s</b>", LINK, "t", "t"])
    labels = np.repeat(np.arange(3), 3)
    pages = {
        "bars.html": interactive.per_class_accuracy_html(table, "plotly.min.js"),
        "heat.html": interactive.confusion_heatmap_html(heat, "plotly.min.js"),
        "emb.html": interactive.embedding_html(np.random.default_rng(0).normal(size=(9, 2)), labels, labels[::-1],
                                               [0, 1, 2], MARKUP[:3], [], "t-SNE", "", plotlyjs="plotly.min.js"),
    }
    with browser_page() as (page, problems):
        for name, text in pages.items():
            (tmp_path / name).write_text(text, encoding="utf-8")
            open_page(page, tmp_path / name)
            assert page.evaluate("() => document.querySelectorAll('.main-svg a, .main-svg b').length") == 0, name
            drawn = page.evaluate("() => [...document.querySelectorAll('.main-svg text')].map(t => t.textContent)")
            assert any('<a href="https://evil.example/x">cat</a>' in t for t in drawn), (name, drawn[:40])
            assert not any("&lt;" in t or "&amp;" in t for t in drawn), (name, drawn[:40])
        assert not problems, problems
