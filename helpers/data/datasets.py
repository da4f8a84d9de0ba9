"""Datasets as in-memory uint8 arrays, plus class names and optional superclasses.

load_dataset reads a split through helpers.data.readers (the file formats), then converts channels and
checks the normalisation; class names given by users are resolved here, and SUPERCLASS_MAP applied.
"""
from __future__ import annotations

import difflib
import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from helpers.data.images import FileImages
from helpers.data.readers import CIFAR_SPECS, load_cifar, load_idx_dataset, load_imagefolder
from helpers.errors import ConfigError, DataError


def readable(name: str) -> str:
    """'maple_tree' -> 'maple tree' (for display only; files keep the raw name)."""
    return name.replace("_", " ")


@dataclass
class Dataset:
    images: np.ndarray | FileImages    # uint8, (N, H, W, C), C in {1, 3}; image folders: decoded when read
    labels: np.ndarray                 # int64, (N,)
    class_names: list[str]             # raw names, e.g. "maple_tree"
    name: str = "custom"               # "cifar100", "cifar10", "fashion_mnist", "mnist", "imagefolder"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    coarse_labels: Optional[np.ndarray] = None   # int64, (N,) or None
    coarse_names: Optional[list[str]] = None
    fingerprint: str = ""              # short hash of images+labels, for caches
    # (num_classes,) superclass of every class, from the whole file (CIFAR-100) or SUPERCLASS_MAP, so a LIMIT
    # that leaves classes out of the images keeps their superclass; None: derived from coarse_labels
    fine_to_coarse_table: Optional[np.ndarray] = None
    source_files: tuple[str, ...] = ()   # absolute paths of the files the images and labels were read from
    resize_note: str = ""              # image folders: what was resized, from which sizes to which ("" = none)
    original_sizes: Optional[np.ndarray] = None   # image folders: int64 (N, 2) height, width of each file
    normalisation_source: str = ""     # where mean/std came from: "MEAN/STD", "the model's pretrained config", ...

    @property
    def input_note(self) -> str:
        """What the model is fed, for the summary: size, channels and normalisation, with their sources."""
        h, w, c = self.images.shape[1:4]
        fmt = lambda v: "(" + ", ".join(f"{x:.4f}" for x in v) + ")"
        return (f"{h}x{w} {'RGB' if c == 3 else 'gray'}, normalised with mean {fmt(self.mean)}, std {fmt(self.std)} "
                f"({self.normalisation_source or 'the dataset standard'})")

    def __post_init__(self) -> None:
        check_unique_names(self.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def display_names(self) -> list[str]:
        return [readable(n) for n in self.class_names]

    @property
    def fine_to_coarse(self) -> Optional[np.ndarray]:
        """(num_classes,) coarse id of each fine class, or None without superclasses."""
        if self.coarse_labels is None:
            return None
        if self.fine_to_coarse_table is not None:
            return np.array(self.fine_to_coarse_table, dtype=np.int64)
        out = np.full(self.num_classes, -1, dtype=np.int64)
        out[self.labels] = self.coarse_labels
        return out


# ---------------------------------------------------------------------------------------------- loaders
DATASETS = ("cifar100", "cifar10", "fashion_mnist", "mnist", "imagefolder")

CIFAR100_MEAN = (0.5070, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2761)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NORMALISATION = {
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "fashion_mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    "mnist": (MNIST_MEAN, MNIST_STD),
    "imagefolder": (IMAGENET_MEAN, IMAGENET_STD),
}


def _canonical_dataset(name: str) -> str:
    key = re.sub(r"[\s_\-]", "", str(name).lower())
    aliases = {"cifar100": "cifar100", "cifar10": "cifar10", "fashionmnist": "fashion_mnist",
               "fmnist": "fashion_mnist", "mnist": "mnist", "imagefolder": "imagefolder"}
    if key not in aliases:
        close = difflib.get_close_matches(str(name).lower(), DATASETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"Unknown DATASET {name!r}. Choose one of: {', '.join(DATASETS)}.{hint}")
    return aliases[key]


def check_unique_names(class_names: Sequence[str]) -> None:
    """DataError naming the class names that occur more than once: a class must be addressable by its name."""
    counts: dict[str, int] = {}
    for n in class_names:
        counts[str(n)] = counts.get(str(n), 0) + 1
    dups = [n for n, c in counts.items() if c > 1]
    if dups:
        listed = ", ".join(f"{n!r} ({counts[n]} times)" for n in dups[:10]) + (", ..." if len(dups) > 10 else "")
        raise DataError(f"The dataset's class list has duplicate names: {listed}. Every class needs its own name: "
                        f"rename the duplicates (folder names or the dataset's meta file).")


SAFE_NAME_CHARS = 60   # characters of the class name kept in a file name (the class id keeps it unique)


def _safe_char(ch: str) -> bool:
    # letters, digits and marks of any script, and . _ -; never separators, controls or what Windows forbids
    return ch in "._-" or unicodedata.category(ch)[0] in "LNM"


def safe_filename(name: str) -> str:
    """Any class name -> a slug safe as (part of) a file name on every OS, readable in any script:
    'T-shirt/top' -> 'T-shirt_top', 'größe' -> 'größe', '楓の木' -> '楓の木'. Path separators, control
    characters, spaces and the characters Windows forbids become '_'; long names are cut to SAFE_NAME_CHARS."""
    text = unicodedata.normalize("NFC", str(name))
    slug = "".join(ch if _safe_char(ch) else "_" for ch in text)
    slug = re.sub(r"_+", "_", slug).strip("._")[:SAFE_NAME_CHARS].rstrip("._")
    if not slug:
        return "unnamed"
    # Windows refuses these as file stems even with an extension.
    if slug.split(".")[0].upper() in {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                                      *(f"LPT{i}" for i in range(1, 10))}:
        slug += "_"
    return slug


def _fingerprint(images, labels: np.ndarray) -> str:
    if isinstance(images, FileImages):
        return images.fingerprint(labels)
    h = hashlib.sha1(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- channels, stats
def _to_gray(images: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma with the same fixed-point rounding as PIL's convert('L')."""
    rgb = images.astype(np.uint32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)[..., None]


def _convert(images, mean: tuple, std: tuple, mode: Optional[str]):
    if mode is None:
        return images, mean, std
    mode = str(mode).lower()
    if mode == "rgb":
        if images.shape[-1] == 1 and isinstance(images, FileImages):
            images = images.with_channels(3)
        elif images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        if len(mean) == 1:
            mean, std = mean * 3, std * 3
        return images, mean, std
    if mode in ("gray", "grey", "l"):
        if images.shape[-1] == 3:
            images = images.with_channels(1) if isinstance(images, FileImages) else _to_gray(images)
        if len(mean) == 3:
            w = (0.299, 0.587, 0.114)
            # Mean of the luma is exact; the std is the fully-correlated bound, close for natural images.
            mean = (sum(a * b for a, b in zip(w, mean)),)
            std = (sum(a * b for a, b in zip(w, std)),)
        return images, mean, std
    raise ConfigError(f"CONVERT_CHANNELS={mode!r} is not valid: use None, 'rgb' (gray data on an RGB model) "
                      f"or 'gray' (RGB data on a one-channel model).")


def _stats(value, default: tuple, channels: int, what: str) -> tuple[float, ...]:
    if value is None:
        out = tuple(float(v) for v in default)
    else:
        try:
            out = tuple(float(v) for v in (value if isinstance(value, (list, tuple, np.ndarray)) else [value]))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{what} must be a number or a list of {channels} numbers, got {value!r}.") from exc
    if len(out) == 1 and channels > 1:
        out = out * channels
    if len(out) != channels:
        raise ConfigError(f"{what} has {len(out)} values but the images have {channels} channel(s). "
                          f"Give {channels} values, or set CONVERT_CHANNELS.")
    if not all(np.isfinite(out)):
        raise ConfigError(f"{what} must be finite numbers, got {out}.")
    return out


# ---------------------------------------------------------------------------------------------- public API
FIXED_CLASS_COUNTS = {"cifar100": 100, "cifar10": 10, "fashion_mnist": 10, "mnist": 10}


def class_count(name: str, root: Optional[str | os.PathLike] = None) -> int:
    """How many classes the dataset has, without loading it: the model is built for this many when it is
    loaded before the data (an image folder counts its class sub-folders)."""
    name = _canonical_dataset(name)
    if name in FIXED_CLASS_COUNTS:
        return FIXED_CLASS_COUNTS[name]
    from torchvision.datasets.folder import find_classes
    folder = Path(root) if root is not None else None
    try:
        return len(find_classes(str(folder))[0])
    except (FileNotFoundError, NotADirectoryError, TypeError) as exc:
        raise DataError(f"DATASET='imagefolder' needs DATA_ROOT to be a folder with one sub-folder of images per "
                        f"class ({folder.resolve() if folder is not None else 'DATA_ROOT is not set'}: {exc}).") from None


def load_dataset(name: str = "cifar100", root: Optional[str | os.PathLike] = None, download: bool = True,
                 split: str = "test", image_size=None, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, limit: Optional[int] = None,
                 convert_channels: Optional[str] = None, model=None) -> Dataset:
    """Load a test (or train) split as uint8 (N, H, W, C) images with labels, class names and
    superclasses where the dataset has them.

    root: for CIFAR the folder that holds `cifar-100-python/` / `cifar-10-batches-py/` (or that folder
    itself); for (Fashion-)MNIST the folder with the idx files (or torchvision's `FashionMNIST/raw`);
    for imagefolder the folder with one sub-folder per class. image_size (int or (h, w)) applies to
    imagefolder only; without it, image-folder images of mixed sizes are resized to the input size `model` (a
    LoadedModel or nn.Module, optional) expects when it is known (model_input_size), else to 32x32, and
    Dataset.resize_note says so. limit keeps the first `limit` images.
    """
    name = _canonical_dataset(name)
    if split not in ("test", "train"):
        raise ConfigError(f"split must be 'test' or 'train', got {split!r}.")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
            raise ConfigError(f"LIMIT must be a positive whole number or None, got {limit!r}.")
        limit = int(limit)
    path = Path(root).expanduser() if root is not None else None

    if name in CIFAR_SPECS:
        parts = load_cifar(name, path, download, split, limit)
    elif name in ("fashion_mnist", "mnist"):
        parts = load_idx_dataset(name, path, download, split, limit)
    else:
        parts = load_imagefolder(path, image_size, limit, model_input_size(model))

    default_mean, default_std = NORMALISATION[name]
    source = "ImageNet statistics, the image-folder default" if name == "imagefolder" else f"the {name} statistics"
    from_model = model_normalisation(model) if name == "imagefolder" else None
    if from_model is not None:   # a timm / torchvision model: the normalisation it was trained with
        default_mean, default_std, source = from_model
    if mean is not None or std is not None:
        source = "MEAN/STD" if mean is not None and std is not None else f"MEAN/STD given in part, else {source}"
    images, default_mean, default_std = _convert(parts["images"], default_mean, default_std, convert_channels)
    channels = images.shape[-1]
    mean = _stats(mean, default_mean, channels, "MEAN")
    std = _stats(std, default_std, channels, "STD")
    if any(s <= 0 for s in std):
        raise ConfigError(f"STD values must be positive, got {std}.")
    labels = parts["labels"]
    sources = parts.get("source_files") or ((str(path.resolve()),) if name == "imagefolder" and path else ())
    return Dataset(images=images, labels=labels, class_names=parts["class_names"], name=name, mean=mean, std=std,
                   coarse_labels=parts["coarse_labels"], coarse_names=parts["coarse_names"],
                   fingerprint=_fingerprint(images, labels), fine_to_coarse_table=parts.get("fine_to_coarse"),
                   source_files=tuple(sources), resize_note=parts.get("resize_note", ""),
                   original_sizes=parts.get("original_sizes"), normalisation_source=source)


def model_input_size(model) -> Optional[tuple[int, int]]:
    """(h, w) input a model expects when it says so: timm's pretrained_cfg / default_cfg 'input_size', or the
    default weights' transforms of a torchvision architecture (crop size). None when unknown. `model` is a
    LoadedModel (its .inner network and .arch are read) or an nn.Module; nothing is downloaded."""
    if model is None:
        return None
    net = getattr(model, "inner", model)
    built = getattr(getattr(net, "patch_embed", None), "img_size", None)   # timm ViT / Swin as built (img_size=...)
    if isinstance(built, (list, tuple)) and len(built) == 2 and all(isinstance(v, int) and v > 0 for v in built):
        return int(built[0]), int(built[1])
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(net, attr, None)
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        if isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size):
            return int(size[1]), int(size[2])
    arch = getattr(model, "arch", None)
    if isinstance(arch, str) and type(net).__module__.startswith("torchvision.models"):
        try:
            import torchvision
            crop = torchvision.models.get_model_weights(arch.removeprefix("torchvision:")).DEFAULT.transforms().crop_size
            side = int(crop[0])
            return (side, int(crop[1]) if len(crop) > 1 else side)
        except Exception:   # an architecture without registered weights: unknown
            return None
    return None


def model_normalisation(model) -> Optional[tuple[tuple[float, ...], tuple[float, ...], str]]:
    """(mean, std, where from) a timm model's pretrained config or a torchvision architecture's default weights
    state; None when the model says nothing. Nothing is downloaded."""
    if model is None:
        return None
    net = getattr(model, "inner", model)
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(net, attr, None)
        if isinstance(cfg, dict) and len(cfg.get("mean") or ()) == 3 and len(cfg.get("std") or ()) == 3:
            return (tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]),
                    f"the model's pretrained config ({attr})")
    arch = getattr(model, "arch", None)
    if isinstance(arch, str) and type(net).__module__.startswith("torchvision.models"):
        try:
            import torchvision
            name = arch.removeprefix("torchvision:")
            tf = torchvision.models.get_model_weights(name).DEFAULT.transforms()
            return (tuple(float(v) for v in tf.mean), tuple(float(v) for v in tf.std),
                    f"torchvision's {name} default weights")
        except Exception:   # an architecture without registered weights: unknown
            return None
    return None


def _norm(name: str) -> str:
    """Case-insensitive, with underscores and spaces equivalent: 'Maple_Tree' ~ 'maple tree'."""
    return " ".join(str(name).replace("_", " ").lower().split())


def _lookup(query, class_names: Sequence[str]) -> Optional[int]:
    """Class id of `query`: an id; else the class whose raw name is exactly `query` (so 'a b' and 'a_b' are both
    addressable); else the one class whose normalised name matches (ConfigError when several do); else a
    digit string as an id."""
    if isinstance(query, (bool, np.bool_)):
        return None
    if isinstance(query, (int, np.integer)):
        return int(query) if 0 <= query < len(class_names) else None
    for text in (str(query), str(query).strip()):
        if text in class_names:
            return list(class_names).index(text)
    key = _norm(query)
    hits = [i for i, n in enumerate(class_names) if _norm(n) == key]
    if len(hits) > 1:
        raise ConfigError(f"Class name {query!r} matches {len(hits)} classes once case, spaces and underscores are "
                          f"ignored ({', '.join(repr(class_names[i]) for i in hits)}). Give the exact name, or "
                          f"the class id.")
    if hits:
        return hits[0]
    text = str(query).strip()
    if text.isdigit() and int(text) < len(class_names):  # "3" as a class id when no class is named "3"
        return int(text)
    return None


def _unknown_message(unknown: Sequence, class_names: Sequence[str], what: str) -> str:
    normed = {_norm(n): n for n in class_names}
    parts = []
    for q in unknown:
        if isinstance(q, (int, np.integer)) and not isinstance(q, (bool, np.bool_)):
            parts.append(f"{q!r} (class ids run from 0 to {len(class_names) - 1})")
            continue
        close = difflib.get_close_matches(_norm(q), list(normed), n=3, cutoff=0.5)
        hint = f" - did you mean {', '.join(repr(normed[c]) for c in close)}?" if close else ""
        parts.append(f"{q!r}{hint}")
    shown = ", ".join(class_names[:12]) + (", ..." if len(class_names) > 12 else "")
    listed = "; ".join(parts)
    return f"Unknown class name(s) in {what}: {listed}{'' if listed.endswith('?') else '.'} Known classes: {shown}"


def resolve_class_names(names, class_names: Sequence[str], what: str = "the class list") -> list[int]:
    """Class names (raw or readable, any case; underscores and spaces alike) or ids -> class ids, in order.
    Unknown names raise ConfigError naming `what` (e.g. "GROUP_CLASSES") and the closest known names."""
    if isinstance(names, (str, int, np.integer)):
        names = [names]
    ids, unknown = [], []
    for q in names:
        i = _lookup(q, class_names)
        if i is None:
            unknown.append(q)
        ids.append(i)
    if unknown:
        raise ConfigError(_unknown_message(unknown, class_names, what))
    return ids


def superclass_mapping(dataset: Dataset, mapping: Optional[dict]) -> Dataset:
    """A copy of `dataset` whose superclasses come from {class name: group name}; every class must be
    mapped. Groups are numbered in the order they first appear in the mapping. None keeps `dataset`."""
    if mapping is None:
        return dataset
    if not isinstance(mapping, dict) or not mapping:
        raise ConfigError(f"SUPERCLASS_MAP must be a non-empty dict {{class name: group name}}, got {mapping!r}.")
    group_of: dict[int, str] = {}
    unknown = []
    for key, group in mapping.items():
        i = _lookup(key, dataset.class_names)
        if i is None:
            unknown.append(key)
            continue
        if i in group_of and group_of[i] != str(group):
            raise ConfigError(f"SUPERCLASS_MAP puts class {dataset.class_names[i]!r} in two groups: "
                              f"{group_of[i]!r} and {str(group)!r}.")
        group_of[i] = str(group)
    if unknown:
        raise ConfigError(_unknown_message(unknown, dataset.class_names, "SUPERCLASS_MAP"))
    missing = [dataset.class_names[i] for i in range(dataset.num_classes) if i not in group_of]
    if missing:
        raise ConfigError(f"SUPERCLASS_MAP leaves {len(missing)} class(es) without a group: {', '.join(missing)}. "
                          f"Map every class to a group name.")
    coarse_names = list(dict.fromkeys(str(g) for g in mapping.values()))
    table = np.array([coarse_names.index(group_of[i]) for i in range(dataset.num_classes)], dtype=np.int64)
    return replace(dataset, coarse_labels=table[dataset.labels], coarse_names=coarse_names, fine_to_coarse_table=table)
