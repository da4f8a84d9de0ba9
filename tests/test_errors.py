"""Every bad input a user can give, end to end: one row per case, run through the entry point the user
calls (the notebook's `Analysis` steps, which the CLI runs too), asserting the error type and that the
message names what went wrong and the fix.

The per-module tests (test_models.py, test_data.py, test_cams.py) cover the variants of each case; this
table is the one place that proves the whole list, and README's Troubleshooting section quotes it.
"""
from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch

from helpers.model.architectures import resnet20
from helpers.config import Params
from helpers.data.datasets import load_dataset
from helpers.data.readers import CIFAR100_OFFICIAL
from helpers.errors import (CheckpointError, ConfigError, DataError, NumericalError, OutputError, SuiteError)
from helpers.model.inference import to_tensor
from helpers.pipeline import Analysis
from helpers.data.synthetic import synthetic_images

from conftest import run_params
from tiny_model import TinyNet

LIMIT = 100


@dataclass
class Ctx:
    tmp: Path
    cifar_root: Path
    tiny: Path                   # an (untrained) TinyNet state_dict for 100 classes
    monkeypatch: pytest.MonkeyPatch

    def params(self, **kw) -> Params:
        return run_params(self.cifar_root, self.tiny, self.tmp / "out", **{"EMBEDDING": "tsne", "LIMIT": LIMIT, **kw})

    def analysis(self, **kw) -> Analysis:
        return Analysis(self.params(**kw), progress=False)

    def save(self, obj, name: str) -> Path:
        path = self.tmp / name
        torch.save(obj, path)
        return path


@dataclass
class Case:
    id: str
    error: type
    # setup(ctx) -> (the user's action, message fragments, optional check run after the error)
    setup: Callable[[Ctx], tuple[Callable[[], object], list[str], Optional[Callable[[], None]]]]


CASES: list[Case] = []


def case(id: str, error: type):
    def register(setup):
        CASES.append(Case(id, error, setup))
        return setup
    return register


def no_figures(out: Path) -> Callable[[], None]:
    def check():
        assert not list(out.rglob("*.png")) and not list(out.rglob("*.csv")), "figures written despite the error"
    return check


def steps(an: Analysis, *names: str) -> Callable[[], None]:
    """The notebook's cells, in order."""
    return lambda: [getattr(an, n)() for n in names]


MODEL_FILE = '''
import torch
from torch import nn


class Fixed10(nn.Module):
    """A classifier whose head is hard-wired to 10 classes (no num_classes argument)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class NaNNet(nn.Module):
    """NaN logits for every image whose top-left normalised red value is positive."""

    def __init__(self, num_classes=100):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        logits = self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))
        bad = (x[:, 0, 0, 0] > 0)[:, None]
        return torch.where(bad, torch.full_like(logits, float("nan")), logits)
'''


def model_file(ctx: Ctx) -> Path:
    path = ctx.tmp / "model.py"
    path.write_text(MODEL_FILE)
    return path


# ------------------------------------------------------------------------------------------------ the table
@case("01-model-path-missing", CheckpointError)
def _(ctx):
    ctx.monkeypatch.chdir(ctx.tmp)
    an = ctx.analysis(MODEL_PATH="checkpoints/missing.pt")
    return an.load_model, [f"MODEL_PATH {ctx.tmp / 'checkpoints' / 'missing.pt'} does not exist",
                           "Fix the path", "MODEL_PATH = None"], None


@case("02-checkpoint-keys-do-not-match", CheckpointError)
def _(ctx):
    path = ctx.save(resnet20(num_classes=100).state_dict(), "r20.pt")
    an = ctx.analysis(MODEL_PATH=str(path), ARCH="resnet56")
    return an.load_model, ["does not fit ARCH='resnet56'", "keys the model needs are missing",
                           "layer1.3.conv1.weight",  # the first missing key, in model order
                           "best match the built-in architecture 'resnet20'", "try ARCH='resnet20'"], None


@case("03-shape-mismatch-cifar10-head", CheckpointError)
def _(ctx):
    path = ctx.save(resnet20(num_classes=10).state_dict(), "cifar10_r20.pt")
    an = ctx.analysis(MODEL_PATH=str(path), ARCH="resnet20")  # the data is CIFAR-100
    return an.load_model, ["fc.weight: checkpoint (10, 64) vs model (100, 64)",
                           "fc.bias: checkpoint (10,) vs model (100,)",
                           "analyse it on a dataset with 10 classes"], None


@case("04-model-classes-differ-from-dataset", ConfigError)
def _(ctx):
    file = model_file(ctx)
    torch.manual_seed(0)
    path = ctx.save(_import(file).Fixed10().state_dict(), "fixed10.pt")
    an = ctx.analysis(MODEL_PATH=str(path), ARCH=f"{file}:Fixed10")
    return an.run_all, ["The model outputs 10 classes but the dataset has 100", "MODEL_PATH/ARCH"], \
        no_figures(an.out)


@case("05-full-pickle-without-opt-in", CheckpointError)
def _(ctx):
    path = ctx.save(TinyNet(num_classes=100), "full_model.pt")
    an = ctx.analysis(MODEL_PATH=str(path), ARCH=None)
    return an.load_model, ["full pickled Python object", "tiny_model.TinyNet", "execute arbitrary code",
                           "ALLOW_UNSAFE_PICKLE = True", "torch.save(model.state_dict(), path)"], None


@case("06-corrupt-or-truncated-checkpoint", CheckpointError)
def _(ctx):
    data = ctx.tiny.read_bytes()
    path = ctx.tmp / "truncated.pt"
    path.write_bytes(data[:len(data) // 2])
    an = ctx.analysis(MODEL_PATH=str(path))
    return an.load_model, [f"The checkpoint {path} is corrupt or truncated", "Copy or download it again"], None


@case("07-cifar100-missing-offline", DataError)
def _(ctx):
    attempts = []

    def offline(request, *args, **kwargs):  # torchvision's real download code runs up to the socket
        attempts.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    ctx.monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = ctx.tmp / "data"
    an = ctx.analysis(DATA_ROOT=str(root), DOWNLOAD=True)

    def tried_torchvision():
        assert attempts and "cifar-100-python.tar.gz" in str(attempts[0])
    return an.load_data, [f"CIFAR-100 is not in {root.resolve()} and could not be downloaded",
                          "Temporary failure in name resolution",
                          "Set DATA_ROOT to the folder that contains `cifar-100-python/`"], tried_torchvision


@case("08-dataset-file-fails-integrity-check", DataError)
def _(ctx):
    folder = ctx.tmp / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    (folder / "meta").write_bytes((ctx.cifar_root / "cifar-100-python" / "meta").read_bytes())
    size, md5 = CIFAR100_OFFICIAL["test"]
    with open(folder / "test", "wb") as fh:  # the official size, damaged contents (e.g. an interrupted copy)
        fh.truncate(size)
    an = ctx.analysis(DATA_ROOT=str(ctx.tmp / "data"))
    return an.load_data, [f"{folder / 'test'} fails the integrity check", f"expected {md5}",
                          "run again with DOWNLOAD=True"], None


@case("09-model-emits-nan-logits", NumericalError)
def _(ctx):
    file = model_file(ctx)
    torch.manual_seed(0)
    path = ctx.save(_import(file).NaNNet().state_dict(), "nan.pt")
    an = ctx.analysis(MODEL_PATH=str(path), ARCH=f"{file}:NaNNet")
    data = load_dataset("cifar100", root=ctx.cifar_root, download=False, limit=LIMIT)
    affected = int((to_tensor(data.images, data.mean, data.std)[:, 0, 0, 0] > 0).sum())
    assert 0 < affected < LIMIT
    return an.run_all, [f"NaN or infinite logits for {affected} of {LIMIT} images",
                        "Stopping before writing misleading figures", "MEAN/STD"], no_figures(an.out)


@case("10-output-folder-not-writable", OutputError)
def _(ctx):
    blocker = ctx.tmp / "a_file"
    blocker.write_text("not a folder")  # root ignores permissions, a regular file blocks even root
    out = blocker / "gradcam_results"
    # A missing checkpoint too: OutputError rather than CheckpointError proves the check runs first.
    params = ctx.params(OUTPUT_DIR=str(out), MODEL_PATH=str(ctx.tmp / "missing.pt"))
    return lambda: Analysis(params, progress=False).run_all(), \
        [f"The output folder {out} is not writable", "Set OUTPUT_DIR"], None


@case("11a-unknown-arch", ConfigError)
def _(ctx):
    path = ctx.save(resnet20(num_classes=100).state_dict(), "r20.pt")
    an = ctx.analysis(MODEL_PATH=str(path), ARCH="resnet57")
    return an.load_model, ["Unknown ARCH 'resnet57'", "Did you mean 'resnet56'", "Valid choices",
                           "resnet110", "torchvision.models", "timm:<name>", "model.py:ClassName"], None


@case("11b-unknown-cam-method", ConfigError)
def _(ctx):
    return lambda: ctx.analysis(CAM_METHOD="gradkam"), \
        ["Unknown CAM_METHOD 'gradkam'", "Valid choices: gradcam, gradcam++, layercam, xgradcam, eigencam, "
         "scorecam, finercam"], None


@case("12-unknown-class-in-group-classes", ConfigError)
def _(ctx):
    an = ctx.analysis(GROUP_CLASSES=["maple tree", "oak_tre", "wilow tree"])
    return steps(an, "load_model", "load_data"), \
        ["Unknown class name(s)", "'oak_tre' - did you mean 'oak_tree'", "'wilow tree' - did you mean "
         "'willow_tree'", "Known classes: apple"], None


@case("13-target-layer-not-found", ConfigError)
def _(ctx):
    an = ctx.analysis(TARGET_LAYER="layer4.1")
    return steps(an, "load_model", "load_data", "predict", "confusion", "class_galleries"), \
        ["Target layer 'layer4.1' not found", "Candidate layers", "default features.8",
         "features.2", "features.5"], None


@case("14-torchscript-model-cams", ConfigError)
def _(ctx):
    path = ctx.tmp / "scripted.pt"
    torch.jit.script(TinyNet(num_classes=100).eval()).save(str(path))
    an = ctx.analysis(MODEL_PATH=str(path), ARCH=None, ALLOW_UNSAFE_PICKLE=True)   # refused without it: 14a
    return an.run_all, [f"TorchScript file {path}", "is TorchScript", "CAMs cannot be computed",
                        "torch.save(model.state_dict(), 'weights.pt')", "MODEL_PATH='weights.pt'",
                        "'path/to/model.py:ClassName'"], no_figures(an.out)


@case("14a-torchscript-without-the-opt-in", CheckpointError)
def _(ctx):
    # TorchScript is code (its forward can write files): refused before torch.jit.load, like a full pickle.
    # tests/test_security.py runs one that writes a file, through compare and the CLI too.
    path = ctx.tmp / "scripted.pt"
    torch.jit.script(TinyNet(num_classes=100).eval()).save(str(path))
    an = ctx.analysis(MODEL_PATH=str(path), ARCH=None)
    return an.run_all, [f"The checkpoint {path} is a TorchScript archive", "refused before anything in it was read",
                        "CAMs cannot be computed", "ALLOW_UNSAFE_PICKLE = True"], no_figures(an.out)


@case("15-grayscale-data-on-rgb-model", DataError)
def _(ctx):
    root = write_mnist(ctx.tmp / "mnist")
    path = ctx.save(TinyNet(num_classes=10).state_dict(), "rgb10.pt")
    an = ctx.analysis(MODEL_PATH=str(path), DATASET="mnist", DATA_ROOT=str(root))
    return an.run_all, ["The data has 1 channel (grayscale) but the model expects 3 (RGB)",
                        "Set CONVERT_CHANNELS='rgb'"], no_figures(an.out)


@case("16-rgb-data-on-grayscale-model", DataError)
def _(ctx):
    path = ctx.save(TinyNet(num_classes=100, in_channels=1).state_dict(), "gray100.pt")
    an = ctx.analysis(MODEL_PATH=str(path))
    return an.run_all, ["The data has 3 channels (RGB) but the model expects 1 (grayscale)",
                        "Set CONVERT_CHANNELS='gray'"], no_figures(an.out)


# ------------------------------------------------------------------------------------------------ helpers
def _import(file: Path):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"errors_model_{abs(hash(str(file)))}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_mnist(root: Path, n: int = 60) -> Path:
    """MNIST-format idx.gz files of generated 28x28 grayscale digits-to-be (10 classes)."""
    import gzip
    import struct
    root.mkdir(parents=True, exist_ok=True)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = synthetic_images(labels, np.arange(10) // 2, size=28, channels=1, seed=1)[..., 0]
    for name, array in (("t10k-images-idx3-ubyte.gz", images), ("t10k-labels-idx1-ubyte.gz", labels)):
        payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
        with gzip.open(root / name, "wb") as fh:
            fh.write(payload)
    return root


@pytest.fixture(scope="module")
def untrained_tiny(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny_untrained.pt"
    torch.save({"state_dict": TinyNet(num_classes=100).state_dict()}, path)
    return path


@pytest.fixture
def ctx(tmp_path, cifar_root, untrained_tiny, monkeypatch) -> Ctx:
    return Ctx(tmp=tmp_path, cifar_root=cifar_root, tiny=untrained_tiny, monkeypatch=monkeypatch)


# ------------------------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_a_clear_error(case: Case, ctx: Ctx):
    action, fragments, after = case.setup(ctx)
    with pytest.raises(SuiteError) as err:
        action()
    assert type(err.value) is case.error, f"{type(err.value).__name__}: {err.value}"
    message = str(err.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message lacks {missing}:\n{message}"
    if after is not None:
        after()


def test_the_table_covers_every_case_of_the_issue():
    numbers = {c.id.split("-")[0].rstrip("ab") for c in CASES}
    assert {f"{i:02d}" for i in range(1, 14)} <= numbers


@pytest.mark.parametrize("direction", ["gray data, RGB model", "RGB data, gray model", "gray data, gray model"])
def test_channel_conversion_is_explicit_and_works(ctx, direction):
    """The fixes named by cases 15 and 16 work: CONVERT_CHANNELS converts, and a grayscale checkpoint
    on grayscale data needs nothing (the model's channel count comes from the checkpoint)."""
    if direction == "gray data, RGB model":
        kw = dict(DATASET="mnist", DATA_ROOT=str(write_mnist(ctx.tmp / "mnist")), CONVERT_CHANNELS="rgb",
                  MODEL_PATH=str(ctx.save(TinyNet(num_classes=10).state_dict(), "m.pt")))
        channels, classes = 3, 10
    elif direction == "RGB data, gray model":
        kw = dict(CONVERT_CHANNELS="gray", MODEL_PATH=str(ctx.save(TinyNet(in_channels=1).state_dict(), "m.pt")))
        channels, classes = 1, 100
    else:
        kw = dict(DATASET="mnist", DATA_ROOT=str(write_mnist(ctx.tmp / "mnist")),
                  MODEL_PATH=str(ctx.save(TinyNet(num_classes=10, in_channels=1).state_dict(), "m.pt")))
        channels, classes = 1, 10
    an = ctx.analysis(**kw)
    an.load_model(); an.load_data(); an.predict()
    assert an.inputs.shape[1] == channels and an.loaded.in_channels == channels
    assert an.preds.logits.shape[1] == classes
    cams = an.cams.get([0, 1, 2], [0, 1, 2])
    assert cams.shape == (3,) + tuple(an.inputs.shape[-2:]) and np.isfinite(cams).all()
    assert an.data.images.shape[-1] == channels  # the galleries show what the model saw
