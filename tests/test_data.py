"""Tests for helpers/data/datasets.py and readers.py (loaders, class-name helpers) and helpers/data/synthetic.py
(format writers)."""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import re
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
from PIL import Image

from helpers.data.datasets import (
    CIFAR100_MEAN, DATASETS, Dataset, load_dataset, resolve_class_names, safe_filename, superclass_mapping,
)
from helpers.errors import ConfigError, DataError
from helpers.data.synthetic import (
    CIFAR10_GROUPS, CIFAR100_COARSE_NAMES, CIFAR100_FINE_NAMES, CIFAR100_FINE_TO_COARSE, synthetic_images,
    write_cifar10, write_cifar100, write_fake_imagefolder,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_META = SHARED / "data" / "cifar-100-python" / "meta"
SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")

# The official fine -> coarse table as commonly published (independent of the membership lists in synthetic.py).
PUBLISHED_COARSE = [4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15,
                    3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4,
                    2, 0, 17, 4, 18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
                    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13]


@pytest.fixture(scope="module")
def c100(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("c100")
    write_cifar100(root, n_test=250, n_train=120, seed=3)
    return root


def copy_cifar(src: Path, dst: Path) -> Path:
    """A private copy of a generated cifar-100-python folder, for tests that damage files."""
    folder = dst / "cifar-100-python"
    folder.mkdir(parents=True)
    for f in (src / "cifar-100-python").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def write_idx(path: Path, array: np.ndarray) -> None:
    """The idx format written by hand: 0x0000, type 0x08 (ubyte), ndim, big-endian dims, raw bytes."""
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


# ---------------------------------------------------------------------------------------------- synthetic constants
@pytest.mark.skipif(not REAL_META.exists(), reason="shared CIFAR-100 meta not available")
def test_hardcoded_cifar100_names_match_the_official_meta():
    with open(REAL_META, "rb") as fh:
        meta = pickle.load(fh, encoding="latin1")
    assert list(CIFAR100_FINE_NAMES) == meta["fine_label_names"]
    assert list(CIFAR100_COARSE_NAMES) == meta["coarse_label_names"]
    assert hashlib.md5(REAL_META.read_bytes()).hexdigest() == "7973b15100ade9c7d40fb424638fde48"


def test_fine_to_coarse_matches_the_published_table():
    assert list(CIFAR100_FINE_TO_COARSE) == PUBLISHED_COARSE
    assert np.bincount(CIFAR100_FINE_TO_COARSE).tolist() == [5] * 20


@pytest.mark.skipif(not REAL_META.exists(), reason="shared CIFAR-100 meta not available")
def test_official_python2_meta_loads_through_the_reader(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "meta").write_bytes(REAL_META.read_bytes())
    write_cifar100(tmp_path / "gen", n_test=100)
    (folder / "test").write_bytes((tmp_path / "gen" / "cifar-100-python" / "test").read_bytes())
    ds = load_dataset("cifar100", root=tmp_path, download=False)
    assert ds.class_names[47] == "maple_tree" and len(ds.coarse_names) == 20


# ---------------------------------------------------------------------------------------------- CIFAR-100 round trip
def test_cifar100_round_trip_matches_written_pixels_and_labels(c100):
    ds = load_dataset("cifar100", root=c100, download=False)
    with open(c100 / "cifar-100-python" / "test", "rb") as fh:
        raw = pickle.load(fh)
    data = raw["data"]
    # Independent decoding of the official layout: pixel (y, x) of plane c is data[c*1024 + y*32 + x].
    expected = np.stack([data[:, c * 1024:(c + 1) * 1024] for c in range(3)], axis=-1).reshape(-1, 32, 32, 3)
    assert ds.images.dtype == np.uint8 and ds.images.shape == (250, 32, 32, 3)
    assert np.array_equal(ds.images, expected)
    assert ds.images[7, 5, 9, 2] == data[7, 2 * 1024 + 5 * 32 + 9]
    labels = np.arange(250) % 100
    assert np.array_equal(ds.images, synthetic_images(labels, CIFAR100_FINE_TO_COARSE, seed=3))
    assert ds.labels.dtype == np.int64 and np.array_equal(ds.labels, labels)
    assert ds.class_names == list(CIFAR100_FINE_NAMES) and ds.coarse_names == list(CIFAR100_COARSE_NAMES)
    assert np.array_equal(ds.coarse_labels, np.array(PUBLISHED_COARSE)[labels])
    assert ds.fine_to_coarse.tolist() == PUBLISHED_COARSE
    assert all("_" not in n for n in ds.display_names) and "maple tree" in ds.display_names
    assert ds.name == "cifar100" and ds.mean == CIFAR100_MEAN and len(ds.std) == 3
    h = hashlib.sha1(labels.astype(np.int64).tobytes() + expected.tobytes()).hexdigest()[:16]
    assert ds.fingerprint == h


def test_root_may_be_the_parent_or_the_cifar_folder(c100):
    a = load_dataset("cifar100", root=c100, download=False)
    b = load_dataset("cifar100", root=c100 / "cifar-100-python", download=False)
    assert a.fingerprint == b.fingerprint and np.array_equal(a.images, b.images)


def test_bytes_keys_and_numpy1_module_names_read_like_the_official_files(tmp_path, c100):
    write_cifar100(tmp_path, n_test=250, seed=3, bytes_keys=True)
    # Python 2 / numpy 1 pickles name numpy.core.multiarray instead of numpy._core.multiarray.
    test_file = tmp_path / "cifar-100-python" / "test"
    blob = test_file.read_bytes()
    assert b"numpy._core.multiarray" in blob
    test_file.write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    ds = load_dataset("cifar100", root=tmp_path, download=False)
    assert ds.fingerprint == load_dataset("cifar100", root=c100, download=False).fingerprint


def python2_cifar_pickle(data: np.ndarray, fine: list[int], coarse: list[int]) -> bytes:
    """The opcodes Python 2 wrote for the official files: byte-string keys, numpy.core names and the
    pixels as one Python 2 str (these decode only with encoding='latin1')."""
    ints = lambda xs: b"(" + b"".join(b"K" + bytes([x]) for x in xs) + b"l"
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
             b"(K\x01J" + struct.pack("<i", len(data)) + b"M\x00\x0c\x86"
             b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
             b"\x89T" + struct.pack("<I", data.nbytes) + data.tobytes() + b"tb")
    return (b"\x80\x02}(U\x04data" + array + b"U\x0bfine_labels" + ints(fine)
            + b"U\rcoarse_labels" + ints(coarse) + b"u.")


def test_python2_pickle_of_the_official_kind_is_read(tmp_path):
    folder = write_cifar100(tmp_path, n_test=1)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    (folder / "test").write_bytes(python2_cifar_pickle(data, [47, 52, 0], [17, 17, 4]))
    ds = load_dataset("cifar100", root=tmp_path, download=False)
    assert ds.labels.tolist() == [47, 52, 0] and ds.coarse_labels.tolist() == [17, 17, 4]
    assert np.array_equal(ds.images[2, :, :, 1], data[2, 1024:2048].reshape(32, 32))


def test_train_split_and_limit(c100):
    train = load_dataset("cifar100", root=c100, split="train", download=False)
    assert train.images.shape == (120, 32, 32, 3) and np.bincount(train.labels, minlength=100).max() == 2
    first = load_dataset("cifar100", root=c100, download=False, limit=30)
    full = load_dataset("cifar100", root=c100, download=False)
    assert np.array_equal(first.images, full.images[:30]) and np.array_equal(first.labels, full.labels[:30])
    assert first.fingerprint != full.fingerprint
    with pytest.raises(ConfigError, match="LIMIT"):
        load_dataset("cifar100", root=c100, download=False, limit=0)
    with pytest.raises(ConfigError, match="split"):
        load_dataset("cifar100", root=c100, download=False, split="val")


# ---------------------------------------------------------------------------------------------- missing / offline
def test_offline_without_data_explains_data_root(tmp_path, monkeypatch):
    import torchvision

    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(DataError) as err:
        load_dataset("cifar100", root=tmp_path / "nothing", download=True)
    msg = str(err.value)
    assert "DATA_ROOT" in msg and "cifar-100-python" in msg and "name resolution" in msg
    assert str((tmp_path / "nothing").resolve()) in msg
    assert calls == [((str(tmp_path / "nothing"),), {"train": False, "download": True})]

    with pytest.raises(DataError, match="DATA_ROOT") as err:
        load_dataset("cifar100", root=tmp_path / "nothing", download=False)
    assert "cifar-100-python" in str(err.value) and len(calls) == 1  # download=False never calls torchvision


def test_successful_download_path_is_read_back(tmp_path, monkeypatch):
    import torchvision

    def fake_download(root, train, download):  # stands in for torchvision extracting the archive
        write_cifar100(root, n_test=100)

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake_download)
    ds = load_dataset("cifar100", root=tmp_path / "fresh", download=True)
    assert ds.images.shape == (100, 32, 32, 3)


def test_incomplete_folder_names_the_missing_file(tmp_path, c100):
    folder = copy_cifar(c100, tmp_path)
    (folder / "meta").unlink()
    with pytest.raises(DataError, match=r"lacks meta"):
        load_dataset("cifar100", root=tmp_path, download=True)


# ---------------------------------------------------------------------------------------------- corrupt files
def test_truncated_test_file_is_named(tmp_path, c100):
    folder = copy_cifar(c100, tmp_path)
    path = folder / "test"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=re.escape(str(path))) as err:
        load_dataset("cifar100", root=tmp_path, download=False)
    assert "truncated" in str(err.value) and "Delete" in str(err.value)


def _rewrite(path: Path, **changes) -> None:
    with open(path, "rb") as fh:
        d = pickle.load(fh)
    d.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del d[k]
    with open(path, "wb") as fh:
        pickle.dump(d, fh, protocol=2)


@pytest.mark.parametrize("change, expect", [
    (dict(data=np.zeros((250, 1024), np.uint8)), r"\(N, 3072\)"),
    (dict(fine_labels=[100] * 250), r"outside 0\.\.99"),
    (dict(fine_labels=[0] * 249), "249 entries"),
    (dict(coarse_labels=None), "missing key"),
    (dict(coarse_labels=[i % 7 for i in range(250)]), "several superclasses"),
    (dict(data=np.zeros((250, 3072), np.float32)), "uint8"),
])
def test_malformed_test_file_is_named(tmp_path, c100, change, expect):
    folder = copy_cifar(c100, tmp_path)
    path = folder / "test"
    _rewrite(path, **change)
    with pytest.raises(DataError, match=expect) as err:
        load_dataset("cifar100", root=tmp_path, download=False)
    assert str(path) in str(err.value)


def test_official_size_with_wrong_md5_fails_integrity(tmp_path, c100):
    folder = copy_cifar(c100, tmp_path)
    path = folder / "meta"
    path.write_bytes(b"\x00" * 1473)  # the size of the official meta, different content
    with pytest.raises(DataError, match="integrity") as err:
        load_dataset("cifar100", root=tmp_path, download=False)
    assert str(path) in str(err.value) and "7973b15100ade9c7d40fb424638fde48" in str(err.value)


class _Planted:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_pickle_that_would_run_code_is_refused(tmp_path, c100):
    folder = copy_cifar(c100, tmp_path)
    marker = tmp_path / "code_ran"
    with open(folder / "test", "wb") as fh:
        pickle.dump({"data": _Planted(str(marker))}, fh)
    with pytest.raises(DataError, match=re.escape(str(folder / "test"))):
        load_dataset("cifar100", root=tmp_path, download=False)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- CIFAR-10
def test_cifar10_test_and_train_splits(tmp_path):
    write_cifar10(tmp_path, n_test=60, n_train=103, seed=1)
    ds = load_dataset("cifar10", root=tmp_path, download=False)
    assert ds.images.shape == (60, 32, 32, 3) and ds.num_classes == 10 and ds.class_names[0] == "airplane"
    assert ds.coarse_labels is None and ds.fine_to_coarse is None and len(ds.mean) == 3
    assert np.array_equal(ds.images, synthetic_images(np.arange(60) % 10, CIFAR10_GROUPS, seed=1))
    train = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py", split="train", download=False, limit=50)
    assert train.images.shape == (50, 32, 32, 3)  # limit stops inside the batches
    assert load_dataset("cifar10", root=tmp_path, split="train", download=False).images.shape[0] == 103


def test_cifar10_offline(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(DataError, match=r"cifar-10-batches-py.*DATA_ROOT|DATA_ROOT.*cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path)


# ---------------------------------------------------------------------------------------------- (Fashion-)MNIST
@pytest.mark.skipif(not SYSTEM_FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_the_system_folder(tmp_path, monkeypatch):
    ds = load_dataset("fashion_mnist", root=None, download=False)
    assert ds.images.shape == (10000, 28, 28, 1) and ds.images.dtype == np.uint8
    assert ds.num_classes == 10 and ds.class_names[0] == "T-shirt/top"
    assert np.bincount(ds.labels).tolist() == [1000] * 10
    with gzip.open(SYSTEM_FMNIST / "t10k-images-idx3-ubyte.gz") as fh:
        first = np.frombuffer(fh.read(16 + 784)[16:], np.uint8).reshape(28, 28)
    assert np.array_equal(ds.images[0, :, :, 0], first)
    with gzip.open(SYSTEM_FMNIST / "t10k-labels-idx1-ubyte.gz") as fh:
        assert ds.labels[0] == fh.read(9)[8]
    assert ds.mean == (0.2860,) and ds.std == (0.3530,)
    # The project default DATA_ROOT ("./data") without the files falls back to the system copy (and says so);
    # any other DATA_ROOT without them is an error (tests/test_checked_inputs.py).
    monkeypatch.chdir(tmp_path)
    ds = load_dataset("fashion_mnist", root="./data", download=False, limit=5)
    assert ds.images.shape[0] == 5 and ds.source_files[0] == str(SYSTEM_FMNIST / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match="DATA_ROOT"):
        load_dataset("fashion_mnist", root="./no-such-dir", download=False, limit=5)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_from_idx_files(tmp_path, suffix):
    labels = (np.arange(50) % 10).astype(np.uint8)
    images = synthetic_images(labels, np.arange(10) // 2, size=28, channels=1, seed=2)[..., 0]
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels)
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images[:20])
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels[:20])
    ds = load_dataset("mnist", root=tmp_path, download=False)
    assert ds.images.shape == (50, 28, 28, 1) and np.array_equal(ds.images[..., 0], images)
    assert np.array_equal(ds.labels, labels) and ds.class_names == [str(d) for d in range(10)]
    assert ds.mean == (0.1307,) and ds.coarse_labels is None
    assert load_dataset("mnist", root=tmp_path, split="train", download=False).images.shape == (20, 28, 28, 1)


def test_mnist_in_torchvision_layout_and_truncated_file(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    labels = np.arange(30, dtype=np.uint8) % 10
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((30, 28, 28), np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", labels)
    assert load_dataset("mnist", root=tmp_path, download=False).images.shape == (30, 28, 28, 1)
    path = raw / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_dataset("mnist", root=tmp_path, download=False)


def test_mnist_offline(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading t10k-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DataError, match="DATA_ROOT") as err:
        load_dataset("mnist", root=tmp_path, download=True)
    assert "Error downloading" in str(err.value)


# ---------------------------------------------------------------------------------------------- ImageFolder
def test_imagefolder_native_size_and_pixels(tmp_path):
    write_fake_imagefolder(tmp_path, ["cat", "dog", "t-shirt"], n_per_class=3, size=20)
    ds = load_dataset("imagefolder", root=tmp_path)
    assert ds.images.shape == (9, 20, 20, 3) and ds.class_names == ["cat", "dog", "t-shirt"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert np.array_equal(ds.images[4], np.asarray(Image.open(tmp_path / "dog" / "img_001.png").convert("RGB")))
    assert ds.mean == (0.485, 0.456, 0.406)
    assert load_dataset("imagefolder", root=tmp_path, image_size=16).images.shape == (9, 16, 16, 3)


def test_imagefolder_mixed_sizes_are_resized_to_32(tmp_path):
    write_fake_imagefolder(tmp_path, 2, n_per_class=2, sizes=[20, 40])
    ds = load_dataset("imagefolder", root=tmp_path, limit=3)
    assert ds.images.shape == (3, 32, 32, 3) and ds.class_names == ["class_0", "class_1"]
    expected = np.asarray(Image.open(tmp_path / "class_0" / "img_001.png").resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(ds.images[1], expected)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("imagefolder", root=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="sub-folder"):
        load_dataset("imagefolder", root=tmp_path / "empty")
    write_fake_imagefolder(tmp_path / "bad", ["a"], n_per_class=2)
    broken = tmp_path / "bad" / "a" / "img_001.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match=re.escape(str(broken))):
        load_dataset("imagefolder", root=tmp_path / "bad")


# ---------------------------------------------------------------------------------------------- channels and stats
def test_convert_channels(tmp_path, c100):
    labels = np.arange(12, dtype=np.uint8) % 10
    write_idx(tmp_path / "t10k-images-idx3-ubyte", synthetic_images(labels, np.arange(10), 28, 1)[..., 0])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    gray = load_dataset("mnist", root=tmp_path, download=False)
    rgb = load_dataset("mnist", root=tmp_path, download=False, convert_channels="rgb")
    assert rgb.images.shape == (12, 28, 28, 3) and rgb.mean == (0.1307,) * 3 and len(rgb.std) == 3
    assert all(np.array_equal(rgb.images[..., c], gray.images[..., 0]) for c in range(3))
    assert gray.fingerprint != rgb.fingerprint

    colour = load_dataset("cifar100", root=c100, download=False, limit=20)
    g = load_dataset("cifar100", root=c100, download=False, limit=20, convert_channels="gray")
    assert g.images.shape == (20, 32, 32, 1) and len(g.mean) == 1 and len(g.std) == 1
    reference = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in colour.images])
    assert np.array_equal(g.images[..., 0], reference)  # same luma as PIL
    assert g.mean[0] == pytest.approx(0.299 * 0.5070 + 0.587 * 0.4865 + 0.114 * 0.4409)
    assert load_dataset("cifar100", root=c100, download=False, limit=5, convert_channels="rgb").images.shape[-1] == 3
    with pytest.raises(ConfigError, match="CONVERT_CHANNELS"):
        load_dataset("cifar100", root=c100, download=False, convert_channels="cmyk")


def test_mean_std_overrides(c100):
    ds = load_dataset("cifar100", root=c100, download=False, mean=[0.5, 0.5, 0.5], std=0.25, limit=3)
    assert ds.mean == (0.5, 0.5, 0.5) and ds.std == (0.25, 0.25, 0.25)
    with pytest.raises(ConfigError, match="3 channel"):
        load_dataset("cifar100", root=c100, download=False, mean=[0.5, 0.5], limit=3)
    with pytest.raises(ConfigError, match="positive"):
        load_dataset("cifar100", root=c100, download=False, std=[0.2, 0.0, 0.2], limit=3)


# ---------------------------------------------------------------------------------------------- names
def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ConfigError) as err:
        load_dataset("cifar1000")
    assert all(n in str(err.value) for n in DATASETS)
    assert load_dataset.__defaults__[0] == "cifar100"


def test_dataset_name_aliases(c100):
    assert load_dataset("CIFAR-100", root=c100, download=False, limit=2).name == "cifar100"


def test_safe_filename():
    assert safe_filename("T-shirt/top") == "T-shirt_top"
    assert safe_filename("maple_tree") == "maple_tree"
    assert safe_filename("a b\\c:d*?") == "a_b_c_d"
    assert safe_filename("../..") == "unnamed"
    assert safe_filename("CON") == "CON_"
    # letters of any script stay readable (they used to become "unnamed"); separators and forbidden characters go
    assert [safe_filename(n) for n in ["Ankle boot", "größe", "x|y", "楓の木", "a\x00b<c>"]] == \
        ["Ankle_boot", "größe", "x_y", "楓の木", "a_b_c"]


def test_resolve_class_names():
    names = list(CIFAR100_FINE_NAMES)
    assert resolve_class_names(["maple_tree", "Maple Tree", "OAK tree", 3, np.int64(4)], names) == [47, 47, 52, 3, 4]
    assert resolve_class_names("willow tree", names) == [96]
    fm = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert resolve_class_names(["t-shirt/top", "ankle_boot", "shirt"], fm) == [0, 9, 6]
    assert resolve_class_names(["3", 3], [str(d) for d in range(10)]) == [3, 3]
    with pytest.raises(ConfigError, match="did you mean 'maple_tree'") as err:
        resolve_class_names(["mapel tree"], names)
    assert "mapel tree" in str(err.value)
    with pytest.raises(ConfigError, match="0 to 99"):
        resolve_class_names([100], names)


def _small_dataset() -> Dataset:
    labels = np.array([0, 1, 2, 3, 2, 1], dtype=np.int64)
    return Dataset(images=np.zeros((6, 4, 4, 3), np.uint8), labels=labels,
                   class_names=["cat", "dog", "sea_lion", "walrus"], name="custom")


def test_superclass_mapping_builds_coarse_labels():
    ds = _small_dataset()
    out = superclass_mapping(ds, {"cat": "pets", "Dog": "pets", "sea lion": "marine", 3: "marine"})
    assert out.coarse_names == ["pets", "marine"]
    assert out.coarse_labels.tolist() == [0, 0, 1, 1, 1, 0]
    assert out.fine_to_coarse.tolist() == [0, 0, 1, 1]
    assert ds.coarse_labels is None  # the input is not modified
    assert superclass_mapping(ds, None) is ds


def test_superclass_mapping_errors():
    ds = _small_dataset()
    with pytest.raises(ConfigError, match="did you mean 'walrus'"):
        superclass_mapping(ds, {"cat": "a", "dog": "a", "sea_lion": "b", "walrsu": "b"})
    with pytest.raises(ConfigError, match=r"without a group: sea_lion, walrus"):
        superclass_mapping(ds, {"cat": "a", "dog": "a"})
    with pytest.raises(ConfigError, match="two groups"):
        superclass_mapping(ds, {"cat": "a", "Cat": "b", "dog": "a", "sea_lion": "b", "walrus": "b"})


# ---------------------------------------------------------------------------------------------- synthetic structure
def test_synthetic_cifar100_is_learnable_with_superclass_structure():
    """A nearest-centroid classifier on 8x8 pooled pixels (sklearn, an independent model) must beat
    chance by far, and its mistakes must stay mostly inside the true superclass."""
    from sklearn.neighbors import NearestCentroid

    f2c = np.asarray(CIFAR100_FINE_TO_COARSE)
    train_y, test_y = np.arange(2000) % 100, np.arange(1000) % 100
    train_x = synthetic_images(train_y, f2c, seed=1, noise=0.3)
    test_x = synthetic_images(test_y, f2c, seed=2, noise=0.3)
    pool = lambda x: x.reshape(len(x), 8, 4, 8, 4, 3).mean(axis=(2, 4)).reshape(len(x), -1)
    pred = NearestCentroid().fit(pool(train_x), train_y).predict(pool(test_x))
    wrong = pred != test_y
    assert (pred == test_y).mean() > 0.2  # chance is 0.01
    assert wrong.sum() > 0 and (f2c[pred[wrong]] == f2c[test_y[wrong]]).mean() > 0.5  # chance is 4/99
    assert np.bincount(test_y).tolist() == [10] * 100
    plain = synthetic_images(test_y[:50], f2c, signal=0.0, noise=0.0)
    # signal=0 removes the class pattern: each image is one flat grey (only the lighting varies)
    assert plain.reshape(50, -1).std(axis=1).max() == 0 and abs(int(plain.mean()) - 128) < 25


def test_synthetic_filenames_and_batch_layout(tmp_path):
    folder = write_cifar100(tmp_path, n_test=7)
    with open(folder / "test", "rb") as fh:
        d = pickle.load(fh)
    assert d["filenames"][3] == "synthetic_s_000003.png" and d["batch_label"] == "testing batch 1 of 1"
    assert d["data"].shape == (7, 3072) and d["data"].dtype == np.uint8
    assert not (folder / "train").exists()
