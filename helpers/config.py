"""Every knob of the analysis in one dataclass, shared by the notebook and the CLI.

The notebook's `parameters` cell defines the same names in UPPER CASE; environment variables
named GRADCAM_<NAME> (e.g. GRADCAM_DATA_ROOT=/data) override them for headless runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Union

from helpers.errors import ConfigError

ENV_PREFIX = "GRADCAM_"
# CLASS_GALLERIES' type: "all" or a count. Named without "int" so that the environment and the command line
# pass it on as text ("all" or digits), which class_gallery_count reads.
GalleryCount = Union[int, str]


@dataclass
class Params:
    MODEL_PATH: Optional[str] = None        # None = the default CIFAR-100 ResNet-56 (downloaded once, cached)
    ARCH: Optional[str] = None              # built-in name, torchvision name, "timm:<name>" or "file.py:Class"
    MODEL_KWARGS: Optional[dict] = None     # extra constructor arguments for ARCH
    ALLOW_UNSAFE_PICKLE: bool = False       # opt in to loading a full pickled model (runs code from the file)
    DATASET: str = "cifar100"               # cifar100, cifar10, fashion_mnist, mnist, imagefolder
    DATA_ROOT: str = "./data"
    DOWNLOAD: bool = True
    LIMIT: Optional[int] = None             # analyse only the first LIMIT test images
    MEAN: Optional[list] = None             # normalisation; None = the dataset's standard values
    STD: Optional[list] = None
    CONVERT_CHANNELS: Optional[str] = None  # "rgb" (gray data on an RGB model) or "gray"
    IMAGE_SIZE: Optional[list] = None       # image folders: a side or [h, w]; None = automatic (model input if mixed)
    SUPERCLASS_MAP: Optional[dict] = None   # {class name: group name} for datasets without superclasses
    OUTPUT_DIR: str = "gradcam_results"
    DEVICE: str = "auto"                    # "auto", "cpu", "cuda", "cuda:1", "mps"
    BATCH_SIZE: int = 256
    MIXED_PRECISION: Optional[bool] = None  # float16 autocast in the inference pass; None = on for CUDA, off elsewhere
    CAM_METHOD: str = "gradcam"
    TARGET_LAYER: Optional[str] = None      # dotted path such as "layer4.1"; None = automatic
    N_WORST: int = 5
    N_BEST: int = 3
    CLASS_GALLERIES: GalleryCount = 100     # per-class galleries drawn: the N weakest classes, or "all"
    TOP_PAIRS: int = 15
    N_PAIR_GALLERIES: int = 5
    PAIR_EXAMPLES: int = 6
    CELL_IMAGES: int = 6                    # index.html: images behind each confusion-matrix cell, worst first
    CELL_IMAGES_MAX: int = 3000             # ... and in all (the largest cells first); bounds the page's size
    GROUP_SIZE: int = 3
    GROUP_CLASSES: Optional[list] = None    # e.g. ["shirt", "t-shirt/top", "pullover"]; None = found automatically
    EMBEDDING: str = "auto"                 # feature-space map: "auto" (UMAP if installed, else t-SNE), "umap", "tsne"
    FORCE_RECOMPUTE: bool = False           # ignore the cache next to the outputs
    SEED: int = 0
    COMPARE_WITH: Optional[str] = None      # a second checkpoint (same ARCH and data): before/after in OUTPUT_DIR/compare/
    LABEL_ERRORS: Optional[str] = "auto"    # human-validated wrong test labels: "auto" (CIFAR: cleanlab/label-errors,
                                            # downloaded once into DATA_ROOT), a path to a *_mturk.json, or None
    TRAIN_EVIDENCE: bool = False            # one pass over the training split: nearest training images, near-duplicates
    TRAIN_ROOT: Optional[str] = None        # image folders: the training images (one sub-folder per class); implies it

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], env: Optional[Mapping[str, str]] = None) -> "Params":
        """Build from a mapping (e.g. the notebook's globals); unknown keys are ignored,
        then GRADCAM_<NAME> environment variables override."""
        known = {k: v for k, v in values.items() if k in cls.names()}
        params = cls(**known)
        return params.with_env(os.environ if env is None else env)

    def with_env(self, env: Mapping[str, str]) -> "Params":
        updates = {}
        for f in fields(self):
            raw = env.get(ENV_PREFIX + f.name)
            if raw is not None:
                updates[f.name] = _parse(f.name, raw, getattr(self, f.name), f.type)
        return dataclasses.replace(self, **updates)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "Params":
        """Check every value that can be checked without the model or the data, so that a wrong one stops the
        run before any compute (ConfigError naming the parameter and what it accepts). Returns self."""
        for name in ("ALLOW_UNSAFE_PICKLE", "DOWNLOAD", "FORCE_RECOMPUTE", "TRAIN_EVIDENCE"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False (got {getattr(self, name)!r}).")
        for name, low in COUNTS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                what = "a positive integer" if low == 1 else ("an integer of at least 2" if low == 2 else
                                                               "a non-negative integer")
                raise ConfigError(f"{name} must be {what} (got {value!r}).")
        if self.MIXED_PRECISION not in (None, True, False):
            raise ConfigError(f"MIXED_PRECISION must be None (on for CUDA), True or False "
                              f"(got {self.MIXED_PRECISION!r}).")
        if self.LIMIT is not None and (isinstance(self.LIMIT, bool) or not isinstance(self.LIMIT, int) or self.LIMIT < 1):
            raise ConfigError(f"LIMIT must be None (every test image) or a positive integer (got {self.LIMIT!r}).")
        class_gallery_count(self.CLASS_GALLERIES, None)
        if self.EMBEDDING not in EMBEDDINGS:
            raise ConfigError(f"Unknown EMBEDDING {self.EMBEDDING!r}. Choose one of: {', '.join(EMBEDDINGS)}.")
        if self.IMAGE_SIZE is not None and not _image_size_ok(self.IMAGE_SIZE):
            raise ConfigError(f"IMAGE_SIZE must be None (automatic), a positive int or [height, width] "
                              f"(got {self.IMAGE_SIZE!r}).")
        if self.CONVERT_CHANNELS not in (None, "rgb", "gray"):
            raise ConfigError(f"CONVERT_CHANNELS must be None, 'rgb' or 'gray' (got {self.CONVERT_CHANNELS!r}).")
        for name in ("MODEL_KWARGS", "SUPERCLASS_MAP"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, dict) and all(isinstance(k, str) for k in value)):
                example = '{"width": 2}' if name == "MODEL_KWARGS" else '{"apple": "fruit", "pear": "fruit"}'
                raise ConfigError(f"{name} must be a JSON object with string keys, e.g. {example} "
                                  f"(got {value!r}).")
        if self.GROUP_CLASSES is not None:
            groups = self.GROUP_CLASSES
            if not isinstance(groups, (list, tuple)) or not all(isinstance(g, (str, int)) and not isinstance(g, bool)
                                                                 for g in groups):
                raise ConfigError(f"GROUP_CLASSES must be a list of class names (or ids), e.g. [\"maple_tree\", "
                                  f"\"oak_tree\"] (got {groups!r}).")
            if len(groups) < 2:
                raise ConfigError(f"GROUP_CLASSES needs at least 2 classes to compare (got {list(groups)!r}).")
        for name in ("OUTPUT_DIR", "DATA_ROOT", "DATASET", "DEVICE", "CAM_METHOD"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name} must be a non-empty string (got {getattr(self, name)!r}).")
        for name in ("MODEL_PATH", "ARCH", "TARGET_LAYER", "COMPARE_WITH", "LABEL_ERRORS", "TRAIN_ROOT"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), (str, os.PathLike)):
                raise ConfigError(f"{name} must be None or a string (got {getattr(self, name)!r}).")
        return self


# The counts and their least allowed value; EMBEDDING's choices.
COUNTS = {"BATCH_SIZE": 1, "N_WORST": 0, "N_BEST": 0, "TOP_PAIRS": 0, "N_PAIR_GALLERIES": 0, "PAIR_EXAMPLES": 0,
          "CELL_IMAGES": 0, "CELL_IMAGES_MAX": 0,
          "GROUP_SIZE": 2, "SEED": 0}
EMBEDDINGS = ("auto", "umap", "tsne")


def class_gallery_count(value: Any, num_classes: Optional[int]) -> Optional[int]:
    """How many per-class galleries CLASS_GALLERIES asks for, at most num_classes ("all": every class); a digit
    string (environment, command line) counts as its number. ConfigError for anything else. With
    num_classes=None, only checks (returns None for "all")."""
    text = value.strip().lower() if isinstance(value, str) else None
    if text == "all":
        return num_classes
    if text is not None and text.isdigit():
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f'CLASS_GALLERIES must be "all" (a gallery for every class) or a non-negative integer '
                          f"(the galleries of that many weakest classes) (got {value!r}).")
    return value if num_classes is None else min(value, num_classes)


def _image_size_ok(value: Any) -> bool:
    """IMAGE_SIZE: a positive int (or digit string, from the environment), or a list/tuple of two of them."""
    sides = list(value) if isinstance(value, (list, tuple)) else [value]
    return len(sides) in (1, 2) and all(
        (isinstance(v, int) and not isinstance(v, bool) and v > 0) or (isinstance(v, str) and v.strip().isdigit()
                                                                        and int(v) > 0) for v in sides)


def _parse(name: str, raw: str, current: Any, type_name: str) -> Any:
    """Environment strings -> typed values ('none' -> None, JSON for lists/dicts)."""
    text = raw.strip()
    if text.lower() in ("", "none", "null"):
        return None
    if "bool" in str(type_name):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{ENV_PREFIX}{name}={raw!r} is not a boolean; use true or false.")
    if "int" in str(type_name):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{ENV_PREFIX}{name}={raw!r} is not an integer.") from None
    if "list" in str(type_name) or "dict" in str(type_name):
        return parse_structured(name, text, "dict" in str(type_name), f"{ENV_PREFIX}{name}")
    return text


def parse_structured(name: str, text: str, wants_dict: bool, where: str) -> Any:
    """A list or dict parameter given as text (environment, command line): JSON; a list may also be
    comma-separated names. A dict parameter that is not a JSON object is an error, never guessed."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if not wants_dict:
            return [part.strip() for part in text.split(",") if part.strip()]
        raise ConfigError(f"{where}={text!r} is not JSON: {name} must be a JSON object, e.g. "
                          f"'{{\"width\": 2}}'.") from None
    if wants_dict and not isinstance(value, dict):
        raise ConfigError(f"{where}={text!r} is not a JSON object: {name} must be one, e.g. '{{\"width\": 2}}'.")
    return value
