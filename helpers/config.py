"""Every knob of the analysis in one dataclass, shared by the notebook and the CLI.

The notebook's `parameters` cell defines the same names in UPPER CASE; environment variables
named GRADCAM_<NAME> (e.g. GRADCAM_DATA_ROOT=/data) override them for headless runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

from helpers.errors import ConfigError

ENV_PREFIX = "GRADCAM_"


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
    SUPERCLASS_MAP: Optional[dict] = None   # {class name: group name} for datasets without superclasses
    OUTPUT_DIR: str = "gradcam_results"
    DEVICE: str = "auto"                    # "auto", "cpu", "cuda", "cuda:1", "mps"
    BATCH_SIZE: int = 256
    CAM_METHOD: str = "gradcam"
    TARGET_LAYER: Optional[str] = None      # dotted path such as "layer4.1"; None = automatic
    N_WORST: int = 5
    N_BEST: int = 3
    TOP_PAIRS: int = 15
    N_PAIR_GALLERIES: int = 5
    PAIR_EXAMPLES: int = 6
    GROUP_SIZE: int = 3
    GROUP_CLASSES: Optional[list] = None    # e.g. ["shirt", "t-shirt/top", "pullover"]; None = found automatically
    EMBEDDING: str = "auto"                 # feature-space map: "auto" (UMAP if installed, else t-SNE), "umap", "tsne"
    FORCE_RECOMPUTE: bool = False           # ignore the cache next to the outputs
    SEED: int = 0
    COMPARE_WITH: Optional[str] = None      # a second checkpoint (same ARCH and data): before/after in OUTPUT_DIR/compare/

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
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            if "list" in str(type_name):
                return [part.strip() for part in text.split(",") if part.strip()]
            raise ConfigError(f"{ENV_PREFIX}{name} must be JSON, e.g. '{{\"apple\": \"fruit\"}}'.") from None
    return text
