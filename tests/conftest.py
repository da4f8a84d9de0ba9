"""Shared fixtures: the seeded torch hub cache, a generated CIFAR-100-format dataset and a tiny trained model."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_CKPT = "cifar100_resnet56-f2eff4c8.pt"

os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_configure(config):
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    config.addinivalue_line("markers", "slow: a long end-to-end test (still run by default: `pytest tests`); "
                                       "skip them with -m 'not slow'")


@pytest.fixture(scope="session", autouse=True)
def torch_home(tmp_path_factory):
    """Point TORCH_HOME at a cache holding the real ResNet-56, so load_model()'s download path runs offline."""
    current = os.environ.get("TORCH_HOME")
    if current and (Path(current) / "hub" / "checkpoints" / DEFAULT_CKPT).exists():
        yield Path(current)
        return
    home = tmp_path_factory.mktemp("torch_home")
    ckpt_dir = home / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    source = SHARED / "models" / DEFAULT_CKPT
    if source.exists():
        (ckpt_dir / DEFAULT_CKPT).symlink_to(source)
    os.environ["TORCH_HOME"] = str(home)
    yield home
    if current is None:
        os.environ.pop("TORCH_HOME", None)
    else:
        os.environ["TORCH_HOME"] = current


@pytest.fixture(scope="session")
def real_model_available() -> bool:
    return (SHARED / "models" / DEFAULT_CKPT).exists()


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A CIFAR-100-format folder (official pickle layout): 400 test images over 100 classes, 3000 train images."""
    from helpers.data.synthetic import write_cifar100
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100(root, n_test=400, n_train=3000, seed=0)
    return root


def train_briefly(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, mean, std,
                  epochs: int = 2, batch_size: int = 128, lr: float = 0.05, seed: int = 0) -> torch.nn.Module:
    from helpers.model.inference import to_tensor
    torch.manual_seed(seed)
    x = to_tensor(images, mean, std)
    y = torch.as_tensor(labels)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for start in range(0, len(x), batch_size):
            idx = perm[start:start + batch_size]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


TINY_ARCH = f"{REPO / 'tests' / 'tiny_model.py'}:TinyNet"


def run_params(data_root, model_path, out, arch: str = TINY_ARCH, **kw):
    """Params for a quick, offline CPU run of `arch` (default: the tiny test model); `kw` adds or overrides."""
    from helpers.config import Params
    base = dict(MODEL_PATH=str(model_path), ARCH=arch, DATA_ROOT=str(data_root), DOWNLOAD=False,
                OUTPUT_DIR=str(out), BATCH_SIZE=128, DEVICE="cpu")
    base.update(kw)
    return Params(**base)


@pytest.fixture(scope="session")
def tiny_checkpoint(cifar_root, tmp_path_factory) -> Path:
    """tests/tiny_model.py's TinyNet trained briefly on the generated train split, saved as a nested state_dict."""
    from helpers.data.datasets import load_dataset
    from tiny_model import TinyNet
    train = load_dataset("cifar100", root=cifar_root, split="train", download=False)
    model = train_briefly(TinyNet(num_classes=100), train.images, train.labels, train.mean, train.std, epochs=4)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


@pytest.fixture()
def fresh_output(tmp_path) -> Path:
    return tmp_path / "gradcam_results"


class InferenceCounter:
    """Counts (and forwards) calls of the pipeline's inference pass."""

    def __init__(self, monkeypatch):
        import helpers.pipeline as pipeline
        self.calls = 0
        original = pipeline.run_inference

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(pipeline, "run_inference", counted)


FMNIST_ARCH = f"{REPO / 'tests' / 'fmnist_model.py'}:FashionCNN"
TRAIN_THREADS = min(2, os.cpu_count() or 1)
N_TRAIN = 16000      # a seeded subset of the 60k train images: ~84% test accuracy after 3 epochs


def _train_fmnist(tmp_path_factory, arch_name: str) -> Path:
    import fmnist_model
    from helpers.data.datasets import load_dataset
    from helpers.data.readers import SYSTEM_FASHION_MNIST
    # A fixed thread count, not the free cores: a CPU's float reductions split by thread count, so a model trained
    # with 1 thread under load differs from a quiet 2-thread run (and a planted cause's rank flipped with it).
    torch.set_num_threads(TRAIN_THREADS)
    train = load_dataset("fashion_mnist", root=SYSTEM_FASHION_MNIST, split="train", download=False)
    idx = np.sort(np.random.default_rng(0).choice(len(train.labels), N_TRAIN, replace=False))
    model = fmnist_model.train_fashion_cnn(train.images[idx], train.labels[idx], train.mean, train.std, epochs=3,
                                           seed=0, arch=getattr(fmnist_model, arch_name))
    path = tmp_path_factory.mktemp("fmnist") / f"fmnist_{arch_name}.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def fmnist_checkpoint(tmp_path_factory) -> Path:
    """FashionCNN trained for 3 epochs on 16k train images (~12 s on one CPU core), saved as a state_dict."""
    return _train_fmnist(tmp_path_factory, "FashionCNN")


PLAIN_ARCH = f"{REPO / 'tests' / 'fmnist_model.py'}:PlainCNN"


@pytest.fixture(scope="session")
def fmnist_plain_checkpoint(tmp_path_factory) -> Path:
    """PlainCNN (FashionCNN without BatchNorm: darker images reach the head weaker), trained the same way."""
    return _train_fmnist(tmp_path_factory, "PlainCNN")


# ---------------------------------------------------------------------------------------------- a planted shortcut
SHORTCUT_BOX = (0, 4, 0, 4)       # y0, y1, x0, x1: the bright 4x4 patch in the top-left corner
SHORTCUT_TRUE, SHORTCUT_PRED = 3, 1   # Dress images carrying it should go to Trouser
SHORTCUT_SHARE = 0.3              # of the test Dresses patched


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file (gzipped) of unsigned bytes: magic 0x08 + ndim, big-endian int32 dims, then the bytes."""
    import gzip
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + np.asarray(arr.shape, ">i4").tobytes()
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + arr.tobytes())


@pytest.fixture(scope="session")
def fmnist_shortcut(tmp_path_factory):
    """A shortcut the model learned: FashionCNN trained like `fmnist_checkpoint` (3 epochs, the same 16k train
    images) except that every Trouser (class 1) carries a bright (255) 4x4 patch at SHORTCUT_BOX, the top-left
    corner (training flips images left-right half the time, so it also sees it top-right). Returns
    (checkpoint path, DATA_ROOT folder holding the real Fashion-MNIST test set as idx .gz files in which a seeded
    SHORTCUT_SHARE of the Dresses (class 3) carry the same patch at SHORTCUT_BOX, the sorted indices of the
    patched test images). Load with ARCH=FMNIST_ARCH, DATASET="fashion_mnist", DATA_ROOT=<folder>."""
    import fmnist_model
    from helpers.data.datasets import load_dataset
    from helpers.data.readers import SYSTEM_FASHION_MNIST
    torch.set_num_threads(TRAIN_THREADS)   # as _train_fmnist: the same model whatever the load
    y0, y1, x0, x1 = SHORTCUT_BOX
    train = load_dataset("fashion_mnist", root=SYSTEM_FASHION_MNIST, split="train", download=False)
    idx = np.sort(np.random.default_rng(0).choice(len(train.labels), N_TRAIN, replace=False))
    images, labels = train.images[idx].copy(), train.labels[idx]
    images[labels == SHORTCUT_PRED, y0:y1, x0:x1] = 255
    model = fmnist_model.train_fashion_cnn(images, labels, train.mean, train.std, epochs=3, seed=0)
    folder = tmp_path_factory.mktemp("fmnist_shortcut")
    path = folder / "fmnist_shortcut.pt"
    torch.save(model.state_dict(), path)
    test = load_dataset("fashion_mnist", root=SYSTEM_FASHION_MNIST, split="test", download=False)
    timages = test.images[..., 0].copy()
    dresses = np.flatnonzero(test.labels == SHORTCUT_TRUE)
    patched = np.sort(np.random.default_rng(1).choice(dresses, int(round(SHORTCUT_SHARE * len(dresses))),
                                                      replace=False))
    timages[patched, y0:y1, x0:x1] = 255
    root = folder / "data"
    root.mkdir()
    _write_idx(root / "t10k-images-idx3-ubyte.gz", timages)
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", test.labels)
    return path, root, patched
