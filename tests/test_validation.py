"""Every parameter is checked before any compute: a wrong value stops the run with a ConfigError that names the
parameter and the fix, before inference, and leaves OUTPUT_DIR (here holding an earlier run's files) and
everything outside it as they were."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import helpers.pipeline
from helpers.config import Params
from helpers.data.datasets import load_dataset
from helpers.data.synthetic import write_fake_imagefolder
from helpers.errors import ConfigError
from helpers.pipeline import Analysis

from conftest import REPO, run_params
from tiny_model import TinyNet


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier_run(tmp_path) -> Path:
    """OUTPUT_DIR holding what an earlier run left (its index and a gallery), and a user file beside it."""
    out = tmp_path / "out"
    (out / "worst_predictions").mkdir(parents=True)
    (out / "index.html").write_text("<html>the earlier run</html>")
    (out / "worst_predictions" / "class_000_apple.png").write_bytes(b"\x89PNG earlier")
    (tmp_path / "notes.txt").write_text("the user's own file")
    return out


@pytest.fixture
def no_inference(monkeypatch):
    monkeypatch.setattr(helpers.pipeline, "run_inference", lambda *a, **k: pytest.fail("inference ran"))


def run_notebook_cells(params: Params) -> None:
    """Cells 2-8 of the notebook: the checks must fire before predict() runs the pass."""
    an = Analysis(params, progress=False)
    an.load_model()
    an.load_data()
    an.predict()


def expect_refusal(params_or_call, fragments: list[str], tmp_path: Path, out: Path) -> str:
    before_out, before_all = snapshot(out), snapshot(tmp_path)
    call = params_or_call if callable(params_or_call) else (lambda: run_notebook_cells(params_or_call))
    with pytest.raises(ConfigError) as err:
        call()
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert snapshot(out) == before_out                 # the earlier run is untouched, nothing new was written
    assert snapshot(tmp_path) == before_all            # and nothing outside OUTPUT_DIR changed
    return message


@pytest.mark.parametrize("change, fragments", [
    (dict(EMBEDDING="bogus"), ["EMBEDDING", "'bogus'", "auto, umap, tsne"]),
    (dict(SEED=-1), ["SEED", "non-negative integer", "-1"]),
    (dict(PAIR_EXAMPLES=-2), ["PAIR_EXAMPLES", "non-negative integer"]),
    (dict(GROUP_SIZE=1), ["GROUP_SIZE", "at least 2"]),
    (dict(BATCH_SIZE=0), ["BATCH_SIZE", "positive integer"]),
    (dict(LIMIT=0), ["LIMIT", "positive integer"]),
    (dict(N_WORST=True), ["N_WORST", "non-negative integer"]),
    (dict(DEVICE="bogus"), ["DEVICE 'bogus'", "'cpu'", "'cuda:<index>'"]),
    (dict(MODEL_KWARGS=["w", "x"]), ["MODEL_KWARGS", "JSON object", '{"width": 2}']),
    (dict(MODEL_KWARGS={1: 2}), ["MODEL_KWARGS", "string keys"]),
    (dict(GROUP_CLASSES=["apple"]), ["GROUP_CLASSES", "at least 2"]),
    (dict(GROUP_CLASSES="apple, pear"), ["GROUP_CLASSES", "list of class names"]),
    (dict(DOWNLOAD="no"), ["DOWNLOAD", "True or False"]),
    (dict(CONVERT_CHANNELS="grey"), ["CONVERT_CHANNELS", "'rgb' or 'gray'"]),
])
def test_values_are_refused_when_the_analysis_is_created(cifar_root, tiny_checkpoint, tmp_path, earlier_run,
                                                          no_inference, change, fragments):
    params = run_params(cifar_root, tiny_checkpoint, earlier_run, **change)
    expect_refusal(lambda: Analysis(params, progress=False), fragments, tmp_path, earlier_run)


def test_group_classes_are_checked_against_the_data_before_inference(cifar_root, tiny_checkpoint, tmp_path,
                                                                     earlier_run, no_inference):
    names = load_dataset("cifar100", root=cifar_root, download=False).class_names
    typo = names[3][:-1] + "x"
    message = expect_refusal(run_params(cifar_root, tiny_checkpoint, earlier_run, GROUP_CLASSES=[names[0], typo]),
                             ["GROUP_CLASSES", repr(typo)], tmp_path, earlier_run)
    assert names[3] in message                             # the closest known name, to fix the typo
    # The same class twice, once by name and once in its readable spelling, is not a group of two.
    twice = [names[1], names[1].replace("_", " ").upper(), names[2]]
    expect_refusal(run_params(cifar_root, tiny_checkpoint, earlier_run, GROUP_CLASSES=twice),
                   ["GROUP_CLASSES", "more than once", repr(names[1])], tmp_path, earlier_run)


def test_group_size_is_reported_as_set(cifar_root, tiny_checkpoint, tmp_path, earlier_run, no_inference):
    expect_refusal(run_params(cifar_root, tiny_checkpoint, earlier_run, GROUP_SIZE=101),
                   ["GROUP_SIZE = 101", "100 classes", "at most 100"], tmp_path, earlier_run)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_model_kwargs_must_be_a_json_object_on_the_command_line(tmp_path, earlier_run, how):
    """`--model-kwargs wx` used to become {'w': 'x'}: now it is refused, without a traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "helpers", "analyze", "--output-dir", str(earlier_run), "--device", "cpu"]
    if how == "flag":
        args += ["--model-kwargs", "wx"]
    else:
        env["GRADCAM_MODEL_KWARGS"] = "[1, 2]"
    before_out, before_all = snapshot(earlier_run), snapshot(tmp_path)
    run = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
    assert "MODEL_KWARGS must be" in run.stderr and ("--model-kwargs" in run.stderr or "GRADCAM_MODEL_KWARGS" in run.stderr)
    assert snapshot(earlier_run) == before_out and snapshot(tmp_path) == before_all


def test_imagefolder_tells_the_model_its_class_count(tmp_path):
    """The model is built for the image folder's 8 classes, also when it is loaded before the data (the
    notebook's order); it used to be built for 100 and refused with a message naming 8 classes."""
    folder = write_fake_imagefolder(tmp_path / "images", 8, n_per_class=3, size=32)
    ckpt = tmp_path / "tiny8.pt"
    torch.save(TinyNet(num_classes=8).state_dict(), ckpt)
    params = run_params(folder, ckpt, tmp_path / "out", DATASET="imagefolder", EMBEDDING="tsne")
    an = Analysis(params, progress=False)
    loaded = an.load_model()
    assert loaded.module(torch.zeros(1, 3, 32, 32)).shape[-1] == 8
    assert an.load_data().num_classes == 8
    assert an.predict().probs.shape == (24, 8)
