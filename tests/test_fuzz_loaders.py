"""Fuzzing the file readers: whatever bytes a checkpoint or dataset file holds, loading it either works
or raises a SuiteError subclass (a message for the user), never another exception, a crash or a hang.

tests/test_models.py already feeds random, truncated and bit-flipped zip checkpoints to load_model;
this file adds the other checkpoint formats (TorchScript, safetensors, the legacy non-zip torch.save
format) and every dataset reader: CIFAR pickles (damaged bytes, and well-formed pickles whose contents
are wrong) and idx(.gz) files. Hypothesis runs derandomized, so every run tries the same cases.
"""
from __future__ import annotations

import contextlib
import gzip
import pickle
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from helpers.model.architectures import resnet20
from helpers.data.datasets import load_dataset
from helpers.errors import SuiteError
from helpers.model.load import load_model
from helpers.data.synthetic import synthetic_images, write_cifar100

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_CKPT = SHARED / "models" / "cifar100_resnet56-f2eff4c8.pt"
REAL_META = SHARED / "data" / "cifar-100-python" / "meta"

FUZZ = settings(max_examples=60, derandomize=True, deadline=None, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PER_EXAMPLE_SECONDS = 30
HEADERS = [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", b"\x1f\x8b\x08\x00", b"\x00\x00\x08\x03",
           b"\x08\x00\x00\x00\x00\x00\x00\x00{"]


class Hung(BaseException):
    """Not an Exception, so no `except Exception` in the code under test can swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float = PER_EXAMPLE_SECONDS):
    def alarm(signum, frame):
        raise Hung(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def flush_denormals():
    # Flipped exponent bits create denormal weights, whose CPU arithmetic is ~100x slower.
    supported = torch.set_flush_denormal(True)
    yield
    if supported:
        torch.set_flush_denormal(False)


def must_load_or_refuse(load, what: str) -> str:
    """Run `load`; only success or a SuiteError is acceptable. Returns 'loaded' or 'refused'."""
    try:
        with time_limit():
            load()
    except SuiteError:
        return "refused"
    except Hung as exc:  # pragma: no cover - the failures being tested for
        pytest.fail(f"{what}: {exc}")
    except Exception as exc:  # pragma: no cover
        pytest.fail(f"{what} raised {type(exc).__name__}: {exc}")
    return "loaded"


@st.composite
def damaged(draw, sources: dict[str, bytes]):
    """(source name, how it was damaged, bytes): a truncated copy, a copy with a few bytes overwritten,
    or random bytes behind a plausible file header."""
    name = draw(st.sampled_from(sorted(sources)))
    src = sources[name]
    kind = draw(st.sampled_from(["truncated", "flipped", "random"]))
    if kind == "truncated":
        return name, kind, src[:draw(st.integers(0, len(src) - 1))]
    if kind == "flipped":
        data = bytearray(src)
        for pos, value in draw(st.lists(st.tuples(st.integers(0, len(src) - 1), st.integers(0, 255)),
                                        min_size=1, max_size=8)):
            data[pos] = value
        return name, kind, bytes(data)
    return name, kind, draw(st.sampled_from(HEADERS)) + draw(st.binary(max_size=4096))


# --------------------------------------------------------------------------------------------- checkpoints
class ScriptNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def _checkpoint_sources(folder: Path) -> dict[str, bytes]:
    torch.manual_seed(0)
    model = resnet20(num_classes=10).eval()
    sources = {}
    torch.save(model.state_dict(), folder / "legacy.pt", _use_new_zipfile_serialization=False)
    sources["legacy.pt"] = (folder / "legacy.pt").read_bytes()
    try:  # installed with timm; optional for the suite
        from safetensors.torch import save_file
    except ImportError:
        pass
    else:
        save_file(model.state_dict(), str(folder / "weights.safetensors"))
        sources["weights.safetensors"] = (folder / "weights.safetensors").read_bytes()
    torch.jit.script(ScriptNet().eval()).save(str(folder / "scripted.pt"))
    sources["scripted.pt"] = (folder / "scripted.pt").read_bytes()
    if REAL_CKPT.is_file():  # the real third-party checkpoint, copied: ../shared is read-only
        sources["real.pt"] = REAL_CKPT.read_bytes()
        (folder / "real.pt").write_bytes(sources["real.pt"])
    return sources


@pytest.fixture(scope="module")
def checkpoint_sources(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    folder = tmp_path_factory.mktemp("ckpt_sources")
    return folder, _checkpoint_sources(folder)


def test_damaged_checkpoints_of_every_format_raise_only_suite_errors(checkpoint_sources, flush_denormals):
    folder, sources = checkpoint_sources
    for name, data in sources.items():  # the undamaged files load: the fuzzing starts from working inputs
        classes = 100 if name == "real.pt" else 10
        unsafe = name == "scripted.pt"   # TorchScript is code: it loads only with the opt-in
        assert must_load_or_refuse(lambda: load_model(folder / name, num_classes=classes,
                                                      allow_unsafe_pickle=unsafe), name) == "loaded"
    outcomes = []

    @FUZZ
    @given(case=damaged(sources), arch=st.sampled_from([None, "resnet20", "resnet56"]))
    def check(case, arch):
        name, kind, data = case
        # Keep the suffix: it is how safetensors files are recognised.
        path = folder / f"fuzz_{Path(name).stem}{Path(name).suffix}"
        path.write_bytes(data)
        classes = 100 if name == "real.pt" else 10
        unsafe = name == "scripted.pt"   # damaged TorchScript still reaches torch.jit.load's own checks
        outcomes.append(must_load_or_refuse(lambda: load_model(path, arch=arch, num_classes=classes,
                                                               allow_unsafe_pickle=unsafe),
                                            f"{kind} {name} ({len(data)} bytes, ARCH={arch})"))

    check()
    assert outcomes.count("refused") >= len(outcomes) // 3  # random and truncated files never load


# --------------------------------------------------------------------------------------------- CIFAR pickles
CIFAR_KEYS = ["data", "fine_labels", "coarse_labels", "filenames", "batch_label",
              "fine_label_names", "coarse_label_names"]


@pytest.fixture(scope="module")
def cifar_sources(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("cifar_src")
    folder = write_cifar100(root, n_test=60, seed=5)
    sources = {"meta": (folder / "meta").read_bytes(), "test": (folder / "test").read_bytes()}
    if REAL_META.is_file():
        sources["official_meta"] = REAL_META.read_bytes()
    return sources


def _write_cifar(folder: Path, sources: dict[str, bytes], damaged_name: str, data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    target = "meta" if damaged_name.endswith("meta") else "test"
    for name in ("meta", "test"):
        (folder / name).write_bytes(data if name == target else sources[name])


def test_damaged_cifar_files_raise_only_suite_errors(cifar_sources, tmp_path):
    folder = tmp_path / "cifar-100-python"
    outcomes = []

    @FUZZ
    @given(case=damaged(cifar_sources), limit=st.sampled_from([None, 7]))
    def check(case, limit):
        name, kind, data = case
        _write_cifar(folder, cifar_sources, name, data)
        outcomes.append(must_load_or_refuse(
            lambda: load_dataset("cifar100", root=tmp_path, download=False, limit=limit),
            f"{kind} {name} ({len(data)} bytes)"))

    check()
    assert "refused" in outcomes


def _values():
    """Anything a wrongly built CIFAR dict might hold under a key."""
    arrays = hnp.arrays(dtype=st.sampled_from([np.uint8, np.int64, np.float32, np.int8, np.bool_, np.uint16]),
                        shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=8))
    scalars = st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=True) | st.text(max_size=8)
    return (scalars | arrays | st.binary(max_size=16)
            | st.lists(st.integers(-3, 120) | st.text(max_size=5) | st.binary(max_size=5), max_size=12))


@st.composite
def cifar_dicts(draw):
    """A well-formed pickle of a dict with some official keys (maybe with plausible values) and wrong values."""
    n = draw(st.integers(0, 6))
    d = {}
    for key in draw(st.lists(st.sampled_from(CIFAR_KEYS + ["labels", "extra"]), unique=True, max_size=8)):
        plausible = draw(st.booleans())
        if plausible and key == "data":
            d[key] = draw(hnp.arrays(np.uint8, (n, 3072)))
        elif plausible and key in ("fine_labels", "coarse_labels"):
            d[key] = draw(st.lists(st.integers(-2, 101), min_size=n, max_size=n))
        elif plausible and key.endswith("names"):
            d[key] = draw(st.lists(st.text(min_size=1, max_size=6), max_size=101))
        else:
            d[key] = draw(_values())
    if draw(st.booleans()):
        d = {k.encode(): v for k, v in d.items()}  # Python 2 byte-string keys, as in the official files
    return d


def test_wrong_cifar_contents_raise_only_suite_errors(cifar_sources, tmp_path):
    folder = tmp_path / "cifar-100-python"
    outcomes = []

    @FUZZ
    @given(which=st.sampled_from(["meta", "test"]), obj=cifar_dicts() | _values(),
           protocol=st.sampled_from([2, pickle.HIGHEST_PROTOCOL]))
    def check(which, obj, protocol):
        _write_cifar(folder, cifar_sources, which, pickle.dumps(obj, protocol=protocol))
        outcomes.append(must_load_or_refuse(lambda: load_dataset("cifar100", root=tmp_path, download=False),
                                            f"{which} = {obj!r:.300}"))

    check()
    assert "refused" in outcomes


# --------------------------------------------------------------------------------------------- idx files
def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.fixture(scope="module")
def idx_sources() -> dict[str, bytes]:
    labels = (np.arange(40) % 10).astype(np.uint8)
    images = synthetic_images(labels, np.arange(10) // 2, size=28, channels=1, seed=4)[..., 0]
    return {"t10k-images-idx3-ubyte": _idx(images), "t10k-labels-idx1-ubyte": _idx(labels)}


@st.composite
def idx_cases(draw, sources):
    """(file name, gzip it?, bytes): damaged raw bytes, or a header with arbitrary type/ndim/dims."""
    if draw(st.booleans()):
        name, kind, data = draw(damaged(sources))
    else:
        name = draw(st.sampled_from(sorted(sources)))
        ndim = draw(st.integers(0, 4))
        dims = draw(st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 40), min_size=ndim, max_size=ndim))
        head = bytes([0, 0, draw(st.sampled_from([0x08, 0x09, 0x0D])), draw(st.integers(0, 255) | st.just(ndim))])
        data = head + struct.pack(f">{ndim}I", *dims) + draw(st.binary(max_size=2000))
    return name, draw(st.booleans()), data


def test_damaged_idx_files_raise_only_suite_errors(idx_sources, tmp_path):
    outcomes = []

    @FUZZ
    @given(case=idx_cases(idx_sources), gz_damage=st.integers(0, 60))
    def check(case, gz_damage):
        name, gz, data = case
        for stale in tmp_path.glob("t10k-*"):
            stale.unlink()
        for other, payload in idx_sources.items():
            body = data if other == name else payload
            if gz:
                packed = gzip.compress(body, mtime=0)
                if other == name and gz_damage:  # a truncated gzip stream
                    packed = packed[:max(0, len(packed) - gz_damage)]
                (tmp_path / f"{other}.gz").write_bytes(packed)
            else:
                (tmp_path / other).write_bytes(body)
        outcomes.append(must_load_or_refuse(lambda: load_dataset("mnist", root=tmp_path, download=False),
                                            f"{name}{'.gz' if gz else ''} ({len(data)} bytes: {data[:24].hex()})"))

    check()
    assert "refused" in outcomes
