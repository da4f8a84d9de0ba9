"""Synthetic datasets in the official on-disk formats, for tests and benchmarks.

Each class gets a learnable pattern: a background colour shared by its group (the CIFAR-100
superclass, or a pair of look-alike classes), plus a blob whose shape and position identify the
class inside its group. Classes of one group therefore look alike, so a briefly trained model
confuses them with each other far more than with the rest: confusion analysis has structure.
"""
from __future__ import annotations

import colorsys
import os
import pickle
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

CIFAR100_FINE_NAMES: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)

# The superclass membership as published on the CIFAR page, in the official superclass order.
_CIFAR100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
CIFAR100_COARSE_NAMES: tuple[str, ...] = tuple(_CIFAR100_SUPERCLASSES)
CIFAR100_FINE_TO_COARSE: tuple[int, ...] = tuple(
    next(g for g, members in enumerate(_CIFAR100_SUPERCLASSES.values()) if fine in members)
    for fine in CIFAR100_FINE_NAMES
)

CIFAR10_NAMES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# The pairs real CIFAR-10 models mix up most; each pair shares a background colour here.
CIFAR10_GROUPS: tuple[int, ...] = (0, 1, 2, 3, 4, 3, 2, 4, 0, 1)

# Blob shapes (sigma_y, sigma_x as fractions of the image side) and positions (centre y, x as
# fractions) of the k-th class inside a group; shapes let translation-invariant CNNs tell them apart.
_BLOB_SHAPES = ((0.10, 0.10), (0.06, 0.22), (0.22, 0.06), (0.16, 0.16), (0.05, 0.05))
_BLOB_CENTRES = ((0.30, 0.30), (0.30, 0.70), (0.70, 0.30), (0.70, 0.70), (0.50, 0.50))


def _group_colours(n_groups: int) -> np.ndarray:
    """(n_groups, 3) well separated background colours in [0, 1]: hues around the circle,
    alternating brightness so neighbouring hues also differ in value."""
    cols = []
    for g in range(n_groups):
        value = 0.75 if g % 2 == 0 else 0.45
        cols.append(colorsys.hsv_to_rgb(g / n_groups, 0.75, value))
    return np.asarray(cols, dtype=np.float32)


def class_groups(n_classes: int, group_size: int = 2) -> np.ndarray:
    """A default grouping for datasets without superclasses: consecutive classes share a group."""
    return np.arange(n_classes) // group_size


def synthetic_images(labels: np.ndarray, groups: Sequence[int], size: int = 32, channels: int = 3,
                     seed: int = 0, signal: float = 1.0, noise: float = 0.08) -> np.ndarray:
    """uint8 (N, size, size, channels) images whose pattern depends on the label.

    groups[c] is the group of class c: classes in one group share the background colour and differ
    by the blob (shape, position, a slight hue shift). `signal` scales the contrast of the class pattern
    against the Gaussian pixel noise (std `noise`); signal=0 gives pure noise around grey.
    """
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    n_groups = int(groups.max()) + 1 if len(groups) else 1
    # Rank of each class inside its group selects its blob.
    rank = np.zeros(len(groups), dtype=np.int64)
    for g in range(n_groups):
        members = np.flatnonzero(groups == g)
        rank[members] = np.arange(len(members))
    bg = _group_colours(n_groups)[groups]                              # (C, 3)
    blob = 1.0 - bg                                                    # complementary colour stands out
    blob = np.clip(blob + 0.15 * np.stack([np.cos(rank), np.sin(rank), -np.cos(rank)], 1), 0, 1)
    shapes = np.asarray(_BLOB_SHAPES, dtype=np.float32)[rank % len(_BLOB_SHAPES)] * size
    centres = np.asarray(_BLOB_CENTRES, dtype=np.float32)[rank % len(_BLOB_CENTRES)] * size
    if channels == 1:
        # Luminance of distinct hues can coincide: give groups spread-out grey levels instead.
        bg = (0.25 + 0.5 * (groups % 5) / 4.0)[:, None].astype(np.float32)
        blob = 1.0 - bg

    rng = np.random.default_rng(seed)
    out = np.empty((len(labels), size, size, channels), dtype=np.uint8)
    coords = np.arange(size, dtype=np.float32) + 0.5
    chunk = 256  # small chunks keep the float32 temporaries in cache (about 3 MB each for 32x32 RGB)
    img = np.empty((chunk, size, size, channels), dtype=np.float32)
    tmp = np.empty_like(img)
    for start in range(0, len(labels), chunk):
        lab = labels[start:start + chunk]
        n = len(lab)
        im, tm = img[:n], tmp[:n]
        # Jitter the blob by up to 1/8 of the side so position is a cue, not a fixed template.
        shift = rng.uniform(-size / 8, size / 8, size=(n, 2)).astype(np.float32)
        cy, cx = centres[lab, 0] + shift[:, 0], centres[lab, 1] + shift[:, 1]
        gy = np.exp(-0.5 * ((coords[None, :] - cy[:, None]) / shapes[lab, 0][:, None]) ** 2)
        gx = np.exp(-0.5 * ((coords[None, :] - cx[:, None]) / shapes[lab, 1][:, None]) ** 2)
        alpha = (gy[:, :, None] * gx[:, None, :])[..., None]           # (n, H, W, 1)
        base = 0.5 + signal * (bg[lab] - 0.5)                          # signal=0 -> plain grey
        top = 0.5 + signal * (blob[lab] - 0.5)
        np.multiply(alpha, (top - base)[:, None, None, :], out=im)
        im += base[:, None, None, :]
        im *= 255.0 * (0.85 + 0.3 * rng.random(size=(n, 1, 1, 1), dtype=np.float32))  # lighting changes
        rng.standard_normal(out=tm, dtype=np.float32)
        tm *= 255.0 * noise
        im += tm
        im += 0.5  # round to nearest on the cast below
        np.clip(im, 0, 255, out=im)
        out[start:start + n] = im
    return out
    return out


def _balanced_labels(n: int, n_classes: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % n_classes


def _to_cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> (N, 3072): the official layout, all R then all G then all B, row-major."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def _dump(path: Path, obj: dict, bytes_keys: bool) -> None:
    if bytes_keys:
        obj = {k.encode("latin1"): v for k, v in obj.items()}
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)  # the protocol of the official (Python 2) files


def write_cifar100(root: str | os.PathLike, n_test: int = 500, n_train: int = 0, seed: int = 0,
                   signal: float = 1.0, bytes_keys: bool = False) -> Path:
    """Write `<root>/cifar-100-python/` with `meta`, `test` (and `train` when n_train > 0) in the
    official pickle layout; returns that folder. Labels cycle through the 100 classes (balanced);
    the coarse labels follow the official superclass mapping."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    _dump(folder / "meta", {"fine_label_names": list(CIFAR100_FINE_NAMES),
                            "coarse_label_names": list(CIFAR100_COARSE_NAMES)}, bytes_keys)
    f2c = np.asarray(CIFAR100_FINE_TO_COARSE, dtype=np.int64)
    for split, n, split_seed, batch_label in (("test", n_test, seed, "testing batch 1 of 1"),
                                              ("train", n_train, seed + 1, "training batch 1 of 1")):
        if split == "train" and n <= 0:
            continue
        labels = _balanced_labels(n, 100)
        images = synthetic_images(labels, f2c, seed=split_seed, signal=signal)
        _dump(folder / split, {
            "filenames": [f"synthetic_s_{i:06d}.png" for i in range(n)],
            "batch_label": batch_label,
            "fine_labels": labels.tolist(),
            "coarse_labels": f2c[labels].tolist(),
            "data": _to_cifar_rows(images),
        }, bytes_keys)
    return folder


def write_cifar10(root: str | os.PathLike, n_test: int = 500, n_train: int = 0, seed: int = 0,
                  signal: float = 1.0, bytes_keys: bool = False) -> Path:
    """Write `<root>/cifar-10-batches-py/` with `batches.meta`, `test_batch` and, when n_train > 0,
    `data_batch_1` .. `data_batch_5` (n_train split across them); returns that folder."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    _dump(folder / "batches.meta", {"label_names": list(CIFAR10_NAMES), "num_cases_per_batch": 10000,
                                    "num_vis": 3072}, bytes_keys)
    batches = [("test_batch", n_test, seed, "testing batch 1 of 1")]
    if n_train > 0:
        sizes = [len(part) for part in np.array_split(np.arange(n_train), 5)]
        batches += [(f"data_batch_{b + 1}", sizes[b], seed + 1 + b, f"training batch {b + 1} of 5") for b in range(5)]
    for fname, n, batch_seed, batch_label in batches:
        labels = _balanced_labels(n, 10)
        images = synthetic_images(labels, CIFAR10_GROUPS, seed=batch_seed, signal=signal)
        _dump(folder / fname, {
            "batch_label": batch_label,
            "labels": labels.tolist(),
            "data": _to_cifar_rows(images),
            "filenames": [f"synthetic_s_{i:06d}.png" for i in range(n)],
        }, bytes_keys)
    return folder


def write_fake_imagefolder(root: str | os.PathLike, classes: Sequence[str] | int = 4, n_per_class: int = 5,
                           size: int = 32, seed: int = 0, signal: float = 1.0,
                           sizes: Optional[Sequence[int]] = None) -> Path:
    """Write `<root>/<class>/img_XXX.png` (ImageFolder layout, RGB PNGs); returns root.
    `classes` is a list of names or a count (names class_0, class_1...). `sizes`, when given, cycles
    through those image sides instead of `size` (to exercise resizing)."""
    from PIL import Image

    names = [f"class_{i}" for i in range(classes)] if isinstance(classes, int) else list(classes)
    root = Path(root)
    groups = class_groups(len(names))
    sides = list(sizes) if sizes else [size]
    for c, name in enumerate(names):
        cdir = root / name
        cdir.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            side = sides[(c * n_per_class + i) % len(sides)]
            img = synthetic_images(np.array([c]), groups, size=side, seed=seed * 100003 + c * 1009 + i,
                                   signal=signal)[0]
            Image.fromarray(img).save(cdir / f"img_{i:03d}.png")
    return root


def write_sized_imagefolder(root: str | os.PathLike, n_images: int, n_classes: int = 20, size: int = 224,
                            seed: int = 0, suffix: str = ".jpg", quality: int = 90) -> Path:
    """Write `<root>/class_XX/img_NNNNNN<suffix>` (ImageFolder layout): n_images // n_classes RGB images of
    size x size per class (the pattern of synthetic_images, classes paired into look-alike groups). JPEG by
    default, so that 20,000 images at 224 px stay a few hundred MB on disk; returns root."""
    from PIL import Image

    root = Path(root)
    groups = class_groups(n_classes)
    per_class = max(1, n_images // n_classes)
    chunk = 32   # synthetic_images' float32 temporaries for 32 images at 224 px: about 20 MB each
    for c in range(n_classes):
        cdir = root / f"class_{c:02d}"
        cdir.mkdir(parents=True, exist_ok=True)
        for start in range(0, per_class, chunk):
            n = min(chunk, per_class - start)
            images = synthetic_images(np.full(n, c), groups, size=size, seed=seed * 100003 + c * 1009 + start)
            for k, img in enumerate(images):
                Image.fromarray(img).save(cdir / f"img_{start + k:06d}{suffix}", quality=quality)
    return root
