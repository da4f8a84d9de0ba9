"""Readers of the datasets' on-disk formats: CIFAR pickles (through an unpickler that builds only arrays),
idx files (the MNIST family) and image folders, with the download fallbacks and integrity checks.

Each load_* returns the parts of a Dataset as a dict (images, labels, class_names, coarse_labels,
coarse_names); helpers.data.datasets.load_dataset normalises them into one.
"""
from __future__ import annotations

import gzip
import pickle
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from helpers.files.digest import file_digest
from helpers.errors import ConfigError, DataError

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(d) for d in range(10)]

# Debian's dataset-fashion-mnist package installs the original idx files here.
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_ROOT = "./data"

# Official CIFAR-100 files: (size in bytes, md5). A file of exactly the official size whose md5
# differs is a damaged copy of the official file (bit rot, interrupted copy over an old one).
CIFAR100_OFFICIAL = {
    "test": (31_049_707, "f0ef6b0ae62326f3e7ffdfab6717acfc"),
    "train": (155_249_918, "16019d7e3df5f24257cddd939b257f8d"),
    "meta": (1_473, "7973b15100ade9c7d40fb424638fde48"),
}


# ---------------------------------------------------------------------------------------------- CIFAR pickles
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, strings, numbers and numpy arrays: a CIFAR batch needs nothing
    else, and refusing everything else means a planted file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which a CIFAR file never contains")
        if module.startswith("numpy.core."):  # numpy 1 name; numpy 2 warns on it, so use numpy._core there
            try:
                return super().find_class("numpy._core." + module.split(".", 2)[2], name)
            except ImportError:  # numpy < 1.26 has no numpy._core
                pass
        return super().find_class(module, name)


def _fix_hint(folder: Path, what: str) -> str:
    return (f"Delete the folder {folder} and run again with DOWNLOAD=True to fetch a fresh copy of {what}, "
            f"or copy the file again from the original archive.")


def _read_cifar_pickle(path: Path, folder: Path, what: str) -> dict:
    """Load one CIFAR pickle with str keys (the official files have Python 2 byte-string keys)."""
    official = CIFAR100_OFFICIAL.get(path.name) if what == "CIFAR-100" else None
    if official is not None and path.stat().st_size == official[0] and file_digest(path, "md5") != official[1]:
        raise DataError(f"{path} fails the integrity check: it has the size of the official {what} file "
                        f"but a different md5 (expected {official[1]}), so it is damaged. {_fix_hint(folder, what)}")
    try:
        with open(path, "rb") as fh:
            obj = _ArrayUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # damaged bytes raise anything from EOFError to OverflowError: all mean "corrupt"
        raise DataError(f"{path} is truncated or not a {what} pickle ({type(exc).__name__}: {exc}). "
                        f"{_fix_hint(folder, what)}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not the dict of a {what} file. {_fix_hint(folder, what)}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _require_keys(d: dict, keys: Sequence[str], path: Path, folder: Path, what: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise DataError(f"{path} is not a valid {what} file: missing key(s) {missing} (found {sorted(map(str, d))}). "
                        f"{_fix_hint(folder, what)}")


def _names(value, key: str, path: Path, folder: Path, what: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{path}: {key!r} must be a non-empty list of names. {_fix_hint(folder, what)}")
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in value]


def _int_labels(value, key: str, n_classes: int, n: int, path: Path, folder: Path, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise DataError(f"{path}: {key!r} is not a list of integers ({exc}). {_fix_hint(folder, what)}") from exc
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: {key!r} must be a 1-D list of integers, got shape {arr.shape} "
                        f"dtype {arr.dtype}. {_fix_hint(folder, what)}")
    if len(arr) != n:
        raise DataError(f"{path}: {key!r} has {len(arr)} entries but 'data' has {n} images. {_fix_hint(folder, what)}")
    if len(arr) and (arr.min() < 0 or arr.max() >= n_classes):
        raise DataError(f"{path}: {key!r} holds values {int(arr.min())}..{int(arr.max())}, outside 0..{n_classes - 1} "
                        f"({n_classes} names in the meta file). {_fix_hint(folder, what)}")
    return arr.astype(np.int64)


def _cifar_images(d: dict, path: Path, folder: Path, what: str, limit: Optional[int]) -> np.ndarray:
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] == 0:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path}: 'data' must be an array of shape (N, 3072) (32x32 RGB planes), got {shape}. "
                        f"{_fix_hint(folder, what)}")
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer) or data.min() < 0 or data.max() > 255:
            raise DataError(f"{path}: 'data' must hold uint8 pixels 0..255, got dtype {data.dtype}. "
                            f"{_fix_hint(folder, what)}")
    rows = data[:limit] if limit is not None else data
    # Official layout: per image 1024 red, 1024 green, 1024 blue values, each plane row-major.
    return np.ascontiguousarray(rows.reshape(len(rows), 3, 32, 32).transpose(0, 2, 3, 1), dtype=np.uint8)


CIFAR_SPECS = {
    "cifar100": dict(what="CIFAR-100", folder="cifar-100-python", meta="meta",
                     splits={"test": ["test"], "train": ["train"]}),
    "cifar10": dict(what="CIFAR-10", folder="cifar-10-batches-py", meta="batches.meta",
                    splits={"test": ["test_batch"], "train": [f"data_batch_{i}" for i in range(1, 6)]}),
}


def _cifar_folder(root: Path, folder_name: str, files: Sequence[str]) -> Path:
    """Accept root as the parent of the CIFAR folder, or as the CIFAR folder itself."""
    if root.name == folder_name or (not (root / folder_name).exists() and all((root / f).exists() for f in files)):
        return root
    return root / folder_name


def _download_cifar(name: str, parent: Path, split: str) -> None:
    import torchvision

    cls = torchvision.datasets.CIFAR100 if name == "cifar100" else torchvision.datasets.CIFAR10
    cls(str(parent), train=(split == "train"), download=True)


def load_cifar(name: str, root: Optional[Path], download: bool, split: str, limit: Optional[int]) -> dict:
    """CIFAR-100 or CIFAR-10 `split` as the parts of a Dataset (images, labels, class and superclass names)."""
    spec = CIFAR_SPECS[name]
    root = root if root is not None else Path(DEFAULT_ROOT)
    what, files = spec["what"], [spec["meta"], *spec["splits"][split]]
    folder = _cifar_folder(root, spec["folder"], files)
    if not folder.exists():
        reason = "DOWNLOAD is False"
        if download:
            try:
                _download_cifar(name, folder.parent, split)
                reason = ""
            except Exception as exc:  # URLError, OSError, RuntimeError, tarfile errors: all mean "not here"
                reason = f"{type(exc).__name__}: {exc}"
        if reason or not folder.exists():
            raise DataError(
                f"{what} is not in {folder.parent.resolve()} and could not be downloaded ({reason or 'no data after download'}). "
                f"Set DATA_ROOT to the folder that contains `{spec['folder']}/` (with {spec['meta']} and "
                f"{' and '.join(spec['splits']['test'])} inside), or connect to the internet and re-run.")
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{folder} exists but lacks {', '.join(missing)}. {_fix_hint(folder, what)} "
                        f"Or set DATA_ROOT to a folder that contains a complete `{spec['folder']}/`.")

    meta_path = folder / spec["meta"]
    meta = _read_cifar_pickle(meta_path, folder, what)
    if name == "cifar100":
        _require_keys(meta, ["fine_label_names", "coarse_label_names"], meta_path, folder, what)
        class_names = _names(meta["fine_label_names"], "fine_label_names", meta_path, folder, what)
        coarse_names = _names(meta["coarse_label_names"], "coarse_label_names", meta_path, folder, what)
    else:
        _require_keys(meta, ["label_names"], meta_path, folder, what)
        class_names = _names(meta["label_names"], "label_names", meta_path, folder, what)
        coarse_names = None

    images, labels, coarse = [], [], []
    remaining = limit
    for fname in spec["splits"][split]:
        if remaining is not None and remaining <= 0:
            break
        path = folder / fname
        d = _read_cifar_pickle(path, folder, what)
        label_key = "fine_labels" if name == "cifar100" else "labels"
        _require_keys(d, ["data", label_key] + (["coarse_labels"] if name == "cifar100" else []), path, folder, what)
        imgs = _cifar_images(d, path, folder, what, remaining)
        n_all = len(d["data"])
        lab = _int_labels(d[label_key], label_key, len(class_names), n_all, path, folder, what)
        if name == "cifar100":
            crs = _int_labels(d["coarse_labels"], "coarse_labels", len(coarse_names), n_all, path, folder, what)
            pairs = np.unique(np.stack([lab, crs], axis=1), axis=0)
            if len(np.unique(pairs[:, 0])) != len(pairs):
                fine = pairs[np.flatnonzero(np.diff(pairs[:, 0]) == 0)[0], 0]
                groups = [coarse_names[c] for c in pairs[pairs[:, 0] == fine, 1]]
                raise DataError(f"{path}: class {class_names[fine]!r} is labelled with several superclasses "
                                f"({', '.join(groups)}); each class must belong to one. {_fix_hint(folder, what)}")
            coarse.append(crs[:len(imgs)])
        images.append(imgs)
        labels.append(lab[:len(imgs)])
        if remaining is not None:
            remaining -= len(imgs)
    return dict(images=np.concatenate(images), labels=np.concatenate(labels), class_names=class_names,
                coarse_labels=np.concatenate(coarse) if coarse else None, coarse_names=coarse_names)


# ---------------------------------------------------------------------------------------------- idx (MNIST family)
def _read_idx(path: Path, ndim: int, what: str) -> np.ndarray:
    """Read an idx file (optionally gzipped) of unsigned bytes with `ndim` dimensions."""
    fix = (f"Delete {path} and run again with DOWNLOAD=True, or copy it again from the original {what} files.")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is truncated or not a valid gzip file ({type(exc).__name__}: {exc}). {fix}") from exc
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"{path} is not an idx file of {ndim}-D unsigned bytes (bad header {raw[:4].hex()}). {fix}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(f"{path} fails the integrity check: the header announces {dims} ({expected} bytes) "
                        f"but the file has {len(raw)} bytes. {fix}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for suffix in ("", ".gz"):
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def load_idx_dataset(name: str, root: Optional[Path], download: bool, split: str, limit: Optional[int]) -> dict:
    """Fashion-MNIST or MNIST `split` from its idx files (found in the usual places) as the parts of a Dataset."""
    what, tv_name = ("Fashion-MNIST", "FashionMNIST") if name == "fashion_mnist" else ("MNIST", "MNIST")
    prefix = "t10k" if split == "test" else "train"
    img_stem, lab_stem = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    base = root if root is not None else Path(DEFAULT_ROOT)
    candidates = [base, base / tv_name / "raw", base / name.replace("_", "-"), base / name]
    if name == "fashion_mnist":
        candidates.append(SYSTEM_FASHION_MNIST)  # also when DATA_ROOT is the project default
    if root is None and name == "fashion_mnist" and SYSTEM_FASHION_MNIST.is_dir():
        candidates.insert(0, SYSTEM_FASHION_MNIST)

    def locate():
        for folder in candidates:
            img, lab = _find_idx(folder, img_stem), _find_idx(folder, lab_stem)
            if img and lab:
                return img, lab
        return None

    found = locate()
    if found is None:
        reason = "DOWNLOAD is False"
        if download:
            try:
                import torchvision
                getattr(torchvision.datasets, tv_name)(str(base), train=(split == "train"), download=True)
                reason = ""
            except Exception as exc:  # every failure here means the files are not available
                reason = f"{type(exc).__name__}: {exc}"
            found = locate()
        if found is None:
            raise DataError(
                f"{what} is not in {base.resolve()} and could not be downloaded ({reason or 'no files after download'}). "
                f"Set DATA_ROOT to the folder that contains {img_stem}.gz and {lab_stem}.gz "
                f"(or `{tv_name}/raw/` with them), or connect to the internet and re-run.")
    img_path, lab_path = found
    images = _read_idx(img_path, 3, what)
    labels = _read_idx(lab_path, 1, what)
    if images.size == 0:
        raise DataError(f"{img_path} holds no image data (shape {images.shape}). Copy the file again from the "
                        f"original {what} files.")
    if len(images) != len(labels):
        raise DataError(f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels; "
                        f"they must come from the same release. Copy both files again.")
    if len(labels) and labels.max() >= 10:
        raise DataError(f"{lab_path} holds label {int(labels.max())}, outside 0..9. Copy the file again.")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    # A writable copy: the idx bytes are a read-only buffer, which torch.from_numpy warns about.
    return dict(images=np.array(images[..., None], copy=True), labels=labels.astype(np.int64),
                class_names=list(FASHION_MNIST_CLASSES if name == "fashion_mnist" else MNIST_CLASSES),
                coarse_labels=None, coarse_names=None)


# ---------------------------------------------------------------------------------------------- ImageFolder
def load_imagefolder(root: Optional[Path], image_size, limit: Optional[int]) -> dict:
    """One sub-folder of images per class, resized to image_size (default: their common size, else 32x32)."""
    from PIL import Image, UnidentifiedImageError

    if root is None:
        raise ConfigError("DATASET='imagefolder' needs DATA_ROOT: a folder with one sub-folder of images per class.")
    if not root.is_dir():
        raise DataError(f"Image folder {root.resolve()} does not exist. Set DATA_ROOT to a folder with one "
                        f"sub-folder of images per class.")
    import torchvision

    try:
        folder = torchvision.datasets.ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{root.resolve()} is not an image folder ({exc}). Put the images of each class in a "
                        f"sub-folder named after the class, e.g. {root}/cat/001.png.") from exc
    samples = folder.samples[:limit] if limit is not None else folder.samples

    def open_image(path):
        try:
            return Image.open(path)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{path} cannot be read as an image ({exc}). Delete or replace it.") from exc

    if image_size is None:
        sizes = set()
        for path, _ in samples:
            with open_image(path) as im:  # opening reads only the header
                sizes.add(im.size)
        (w, h) = sizes.pop() if len(sizes) == 1 else (32, 32)
    elif isinstance(image_size, int):
        w = h = image_size
    else:
        h, w = image_size
    images = np.empty((len(samples), h, w, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        try:
            with open_image(path) as im:
                im = im.convert("RGB")
                if im.size != (w, h):
                    im = im.resize((w, h), Image.Resampling.BILINEAR)
                images[i] = np.asarray(im)
        except OSError as exc:  # truncated image data shows up only when decoding
            raise DataError(f"{path} cannot be decoded ({exc}). Delete or replace it.") from exc
    labels = np.array([t for _, t in samples], dtype=np.int64)
    return dict(images=images, labels=labels, class_names=list(folder.classes), coarse_labels=None, coarse_names=None)
