"""Readers of the datasets' on-disk formats: CIFAR pickles (through an unpickler that builds only arrays),
idx files (the MNIST family) and image folders, with the download fallbacks and integrity checks.

Each load_* returns the parts of a Dataset as a dict (images, labels, class_names, coarse_labels,
coarse_names; CIFAR-100 also fine_to_coarse, the superclass of every class in the whole file; and source_files,
the files read); helpers.data.datasets.load_dataset normalises them into one.
"""
from __future__ import annotations

import gzip
import pickle
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from helpers.data.images import FileImages
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

    images, labels, coarse, read = [], [], [], [meta_path]
    fine_to_coarse = np.full(len(class_names), -1, dtype=np.int64) if name == "cifar100" else None
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
            known = fine_to_coarse[pairs[:, 0]]
            if np.any((known >= 0) & (known != pairs[:, 1])):   # files of one split that disagree
                fine = int(pairs[np.flatnonzero((known >= 0) & (known != pairs[:, 1]))[0], 0])
                raise DataError(f"{path}: class {class_names[fine]!r} has another superclass than in the files "
                                f"before it; each class must belong to one. {_fix_hint(folder, what)}")
            # The superclass of every class in the file, not only of those among the first LIMIT images.
            fine_to_coarse[pairs[:, 0]] = pairs[:, 1]
            coarse.append(crs[:len(imgs)])
        read.append(path)
        images.append(imgs)
        labels.append(lab[:len(imgs)])
        if remaining is not None:
            remaining -= len(imgs)
    return dict(images=np.concatenate(images), labels=np.concatenate(labels), class_names=class_names,
                coarse_labels=np.concatenate(coarse) if coarse else None, coarse_names=coarse_names,
                fine_to_coarse=fine_to_coarse, source_files=tuple(str(p.resolve()) for p in read))


# ---------------------------------------------------------------------------------------------- idx (MNIST family)
# The largest idx file read: 4x the MNIST family's biggest (the 60000x28x28 train images, 47 MB) would do; a header
# announcing more is damaged or hostile and is refused before anything is allocated.
MAX_IDX_BYTES = 1 << 30
# Deflate never expands more than ~1032:1, so a .gz file cannot hold more than this many bytes per stored byte.
MAX_GZIP_RATIO = 1032


def _read_exactly(fh, count: int) -> np.ndarray:
    """`count` bytes from `fh` into a fresh array (read in blocks: a short file yields a shorter array)."""
    out = np.empty(count, dtype=np.uint8)
    view, got = memoryview(out), 0
    while got < count:
        n = fh.readinto(view[got:got + (16 << 20)])
        if not n:
            break
        got += n
    return out[:got]


def _read_idx(path: Path, ndim: int, what: str) -> np.ndarray:
    """Read an idx file (optionally gzipped) of unsigned bytes with `ndim` dimensions: the header, then exactly the
    bytes its dims announce (never more: a gzip bomb is not inflated), after checking that size is plausible."""
    fix = (f"Delete {path} and run again with DOWNLOAD=True, or copy it again from the original {what} files.")
    gz = path.suffix == ".gz"
    header = 4 + 4 * ndim
    try:
        stored = path.stat().st_size
        with (gzip.open if gz else open)(path, "rb") as fh:
            head = fh.read(header)
            if len(head) < header or head[:2] != b"\0\0" or head[2] != 0x08 or head[3] != ndim:
                raise DataError(f"{path} is not an idx file of {ndim}-D unsigned bytes (bad header "
                                f"{head[:4].hex() or 'empty file'}). {fix}")
            dims = struct.unpack(f">{ndim}I", head[4:header])
            size = 1
            for d in dims:   # Python ints: 2**32-1 per dim cannot overflow
                size *= d
            announced = f"the header announces {' x '.join(map(str, dims))} = {size:,} bytes of data"
            if size > MAX_IDX_BYTES:
                raise DataError(f"{path} is not a plausible {what} file: {announced}, more than the {MAX_IDX_BYTES:,} "
                                f"bytes any idx file of the MNIST family holds, so the header is damaged. {fix}")
            limit = stored * MAX_GZIP_RATIO + (1 << 16) if gz else stored - header
            if size > limit:
                has = (f"{stored:,} compressed bytes, which cannot inflate to more than {limit:,}" if gz
                       else f"{max(0, stored - header):,} bytes after the header")
                raise DataError(f"{path} fails the integrity check: {announced}, but the file has only {has}, "
                                f"so it is truncated. {fix}")
            data = _read_exactly(fh, size)
            trailing = len(fh.read(1)) if len(data) == size else 0
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is truncated or not a valid gzip file ({type(exc).__name__}: {exc}). {fix}") from exc
    if len(data) != size or trailing:
        found = f"only {len(data):,}" if len(data) != size else "more data than that (it goes on after them)"
        raise DataError(f"{path} fails the integrity check: {announced}, but the file holds {found}. {fix}")
    return data.reshape(dims)


def is_default_root(root: Optional[Path]) -> bool:
    """DATA_ROOT not set, or left at the project default './data'."""
    return root is None or Path(root) == Path(DEFAULT_ROOT)


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
    # The system copy stands in only for DATA_ROOT left at its default: a DATA_ROOT the user gives is where
    # the data must be, never silently replaced by other files (the Dataset records which files were read).
    system = name == "fashion_mnist" and is_default_root(root)
    if system:
        candidates.append(SYSTEM_FASHION_MNIST)

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
            where = (f"DATA_ROOT={str(root)!r} ({base.resolve()})" if root is not None else str(base.resolve()))
            also = (f" The system copy in {SYSTEM_FASHION_MNIST} is used only while DATA_ROOT is left at its default "
                    f"{DEFAULT_ROOT!r}; to use it, set DATA_ROOT={str(SYSTEM_FASHION_MNIST)!r}."
                    if name == "fashion_mnist" and not system else "")
            raise DataError(
                f"{what} is not in {where} and could not be downloaded ({reason or 'no files after download'}). "
                f"Set DATA_ROOT to the folder that contains {img_stem}.gz and {lab_stem}.gz "
                f"(or `{tv_name}/raw/` with them), or connect to the internet and re-run.{also}")
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
    # A copy of just the images kept (a LIMIT slice would otherwise hold the whole file's buffer).
    return dict(images=np.array(images[..., None], copy=True), labels=labels.astype(np.int64),
                class_names=list(FASHION_MNIST_CLASSES if name == "fashion_mnist" else MNIST_CLASSES),
                coarse_labels=None, coarse_names=None, source_files=(str(img_path.resolve()), str(lab_path.resolve())))


# ---------------------------------------------------------------------------------------------- ImageFolder
DEFAULT_IMAGE_SIZE = (32, 32)   # mixed sizes, no IMAGE_SIZE and no known model input size: the built-in models' input


def image_size_hw(image_size, what: str = "IMAGE_SIZE") -> Optional[tuple[int, int]]:
    """None, an int side, or [h, w] (ints or digit strings, e.g. from the environment) -> (h, w) or None."""
    if image_size is None:
        return None
    values = list(image_size) if isinstance(image_size, (list, tuple)) else [image_size]
    try:
        if len(values) not in (1, 2) or any(isinstance(v, (bool, float)) for v in values):
            raise ValueError
        sides = [int(str(v).strip()) if isinstance(v, str) else int(v) for v in values]
    except (TypeError, ValueError):
        sides = []
    if not sides or any(s < 1 for s in sides):
        raise ConfigError(f"{what} must be None (automatic), a positive int (square images) or [height, width] "
                          f"(got {image_size!r}).")
    return (sides[0], sides[0]) if len(sides) == 1 else (sides[0], sides[1])


def bomb_error(path, exc) -> DataError:
    from PIL import Image
    return DataError(f"{path} is too large to decode safely: Pillow refuses it as a possible decompression bomb "
                     f"({exc}). Shrink or delete the image; if you trust the file, raise the limit before the run "
                     f"with PIL.Image.MAX_IMAGE_PIXELS = <pixels> (now {Image.MAX_IMAGE_PIXELS}).")


def open_image(path):
    """Image.open with every failure a DataError naming the file (decompression bombs included: Pillow's
    warning for images over MAX_IMAGE_PIXELS is refused like its error for twice that)."""
    import warnings
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise bomb_error(path, exc) from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path} cannot be read as an image ({exc}). Delete or replace it.") from exc


def to_rgb(im):
    """RGB PIL image of any mode. 16-bit and 32-bit integer grey images (PNG "I;16", "I") are scaled to 8 bits by
    their bit depth (65535 -> 255): convert("RGB") clips them, which turns a 16-bit photo almost white."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) <= 65535 else float(arr.max())
        arr = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode == "F":   # float images: taken as 0..1 when they fit, else scaled by their max
        arr = np.asarray(im).astype(np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else float(arr.max())
        return Image.fromarray(np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    return im.convert("RGB")


def _sizes_text(sizes: dict) -> str:
    shown = sorted(sizes.items(), key=lambda kv: -kv[1])
    parts = [f"{h}x{w} ({n})" for (h, w), n in shown[:5]]
    return ", ".join(parts) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")


def load_imagefolder(root: Optional[Path], image_size, limit: Optional[int],
                     model_input_size=None) -> dict:
    """One sub-folder of images per class, as the parts of a Dataset plus `resize_note` (what was resized, from
    which sizes to which, and why; "" when nothing was).

    image_size (IMAGE_SIZE): an int or (h, w) resizes every image to it. None: model_input_size (the model's
    expected input, when known), else the images' common size, else (mixed sizes) DEFAULT_IMAGE_SIZE. The images
    are FileImages: decoded when read."""
    if root is None:
        raise ConfigError("DATASET='imagefolder' needs DATA_ROOT: a folder with one sub-folder of images per class.")
    if not root.is_dir():
        raise DataError(f"Image folder {root.resolve()} does not exist. Set DATA_ROOT to a folder with one "
                        f"sub-folder of images per class.")
    import torchvision

    target = image_size_hw(image_size)
    try:
        folder = torchvision.datasets.ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{root.resolve()} is not an image folder ({exc}). Put the images of each class in a "
                        f"sub-folder named after the class, e.g. {root}/cat/001.png.") from exc
    samples = folder.samples[:limit] if limit is not None else folder.samples

    sizes: dict[tuple[int, int], int] = {}
    original = np.zeros((len(samples), 2), dtype=np.int64)   # (height, width) of each file, before any resize
    for i, (path, _) in enumerate(samples):
        with open_image(path) as im:  # opening reads only the header
            sizes[(im.size[1], im.size[0])] = sizes.get((im.size[1], im.size[0]), 0) + 1
            original[i] = im.size[1], im.size[0]
    note = ""
    model_hw = image_size_hw(model_input_size, "the model's input size") if model_input_size is not None else None
    if target is not None:
        why = "IMAGE_SIZE"
    elif model_hw is not None:   # a timm / torchvision model says what it was trained at: feed it that
        target, why = model_hw, "the model's expected input size; set IMAGE_SIZE to choose"
    elif len(sizes) == 1:
        target, why = next(iter(sizes)), ""
    else:
        target, why = DEFAULT_IMAGE_SIZE, "the default for images of mixed sizes; set IMAGE_SIZE to choose"
    h, w = target
    if any(s != target for s in sizes):
        note = f"resized from {_sizes_text(sizes)} to {h}x{w} ({why})"
    # Decoded when read (helpers.data.images): memory stays bounded as the folder grows. The headers were read
    # above; a file whose data is damaged fails in the inference pass, before anything is written.
    images = FileImages([path for path, _ in samples], (h, w))
    labels = np.array([t for _, t in samples], dtype=np.int64)
    return dict(images=images, labels=labels, class_names=list(folder.classes), coarse_labels=None, coarse_names=None,
                resize_note=note, original_sizes=original)
