"""Load the classifier to analyse: the default CIFAR-100 ResNet-56 or a user's checkpoint.

Every failure a user can cause becomes a SuiteError subclass whose message names the fix.
Checkpoints are always read with `torch.load(weights_only=True)`; a full pickled model (which can
run arbitrary code while loading) is only accepted with the explicit opt-in `allow_unsafe_pickle=True`
(notebook parameter ALLOW_UNSAFE_PICKLE).

Target layers for Grad-CAM are dotted paths relative to the *inner* model, `unwrap(loaded.module)`:
when the model's forward returns something other than a tensor it is wrapped in `LogitsWrapper`,
whose `model` attribute is the original network.
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import inspect
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import urlparse

import torch
from torch import nn

from helpers.model.architectures import BUILTIN_ARCHS
from helpers.errors import CheckpointError, ConfigError, DataError, ModelLoadError, SuiteError

DEFAULT_MODEL_URL = (
    "https://github.com/chenyaofo/pytorch-cifar-models/releases/download/resnet/cifar100_resnet56-f2eff4c8.pt"
)
DEFAULT_ARCH = "resnet56"
DEFAULT_MODEL_FILENAME = os.path.basename(urlparse(DEFAULT_MODEL_URL).path)
DEFAULT_MODEL_SHA256 = "f2eff4c8461ca1e0d39af83a65f7243bf7d29ec421efee3064bcee93a3caaa73"
DEFAULT_NUM_CLASSES = 100

# Where a training script may have nested the state_dict inside the checkpoint dict.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")
# Wrappers whose prefixes are stripped: nn.DataParallel / DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Input sizes tried by the probe forward in load_model (CIFAR-sized first, then ImageNet-sized).
PROBE_SIZES = ((32, 32), (224, 224))
SHOW_KEYS = 5


@dataclass
class LoadedModel:
    module: nn.Module      # eval mode, on the device; forward(x) returns a logits tensor (N, num_classes)
    arch: str              # e.g. "resnet56", "timm:vit_tiny_patch16_224", "model.py:Net", "torchscript"
    source: str            # where the weights came from, for reports
    weights_sha256: str    # sha256 of the checkpoint file's bytes; a cache key for results
    num_classes: int       # output size of the model (measured by a probe forward when possible)
    in_channels: int

    @property
    def inner(self) -> nn.Module:
        """The network itself (without LogitsWrapper): target-layer paths are relative to this."""
        return unwrap(self.module)


class LogitsWrapper(nn.Module):
    """Makes forward return the logits tensor for models that return a tuple/list, a dict with
    'logits', or an object with `.logits` (e.g. HuggingFace ModelOutput). The wrapped network stays
    reachable as `.model`, so layer paths such as "layer4.1" are looked up on `unwrap(module)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return extract_logits(self.model(*args, **kwargs))


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside any LogitsWrapper layers."""
    while isinstance(module, LogitsWrapper):
        module = module.model
    return module


def extract_logits(output: Any) -> torch.Tensor:
    """The logits tensor inside a model output (tensor, .logits, {'logits': ...}, or first of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output:
            return extract_logits(output["logits"])
        raise ModelLoadError(
            f"The model returns a dict with keys {sorted(map(str, output))[:10]} but no 'logits'. "
            "Wrap it so that forward returns the class scores as a tensor (N, num_classes)."
        )
    logits = getattr(output, "logits", None)
    if logits is not None:
        return extract_logits(logits)
    if isinstance(output, (tuple, list)) and len(output) > 0:
        return extract_logits(output[0])
    raise ModelLoadError(
        f"The model returns {type(output).__name__}, not a logits tensor. "
        "Wrap it so that forward returns the class scores as a tensor (N, num_classes)."
    )


def default_model_cache_path() -> Path:
    """Where torch.hub keeps the default checkpoint: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / DEFAULT_MODEL_FILENAME


def describe_arch_choices() -> str:
    builtins = ", ".join(BUILTIN_ARCHS)
    return (
        f"built-in: {builtins}; any torchvision.models classification name (e.g. 'vgg11_bn', "
        "'mobilenet_v3_small'; 'torchvision:resnet18' for the ImageNet-stem ResNet); 'timm:<name>' "
        "(needs `pip install timm`); 'path/to/model.py:ClassName' (your own class, MODEL_KWARGS go to its "
        "constructor); or leave ARCH empty for TorchScript files and checkpoints of the built-ins"
    )


# ----------------------------------------------------------------------------------------------
# Building architectures

def _torchvision_names() -> list[str]:
    import torchvision

    # Only the classification models live at the top level of torchvision.models.
    return list(torchvision.models.list_models(module=torchvision.models))


def build_model(arch: str, num_classes: int = 100, in_channels: int = 3,
                model_kwargs: Optional[dict] = None) -> nn.Module:
    """A randomly initialised network for an ARCH string (see describe_arch_choices)."""
    kwargs = dict(model_kwargs or {})
    name = arch.strip()
    if name in BUILTIN_ARCHS:
        try:
            return BUILTIN_ARCHS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
        except TypeError as exc:
            raise ConfigError(
                f"ARCH='{name}' takes only num_classes and in_channels; remove MODEL_KWARGS {kwargs} ({exc})."
            ) from None
    if name.startswith("timm:"):
        return _build_timm(name[len("timm:"):], num_classes, in_channels, kwargs)
    if ":" in name and name.rsplit(":", 1)[0].endswith(".py"):
        file_part, class_name = name.rsplit(":", 1)
        return _build_from_file(Path(file_part), class_name, num_classes, in_channels, kwargs)
    tv_name = name[len("torchvision:"):] if name.startswith("torchvision:") else name
    if tv_name in _torchvision_names():
        return _build_torchvision(tv_name, num_classes, in_channels, kwargs)
    choices = list(dict.fromkeys(list(BUILTIN_ARCHS) + _torchvision_names()))
    close = difflib.get_close_matches(name, choices, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"Unknown ARCH '{arch}'.{hint} Valid choices: {describe_arch_choices()}.")


def _build_torchvision(name: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    import torchvision

    if in_channels != 3:
        raise ConfigError(
            f"torchvision's '{name}' takes 3-channel (RGB) input but in_channels={in_channels}. "
            "Set CONVERT_CHANNELS='rgb' to feed grayscale data to it, or use a built-in architecture."
        )
    kwargs = {"num_classes": num_classes, **kwargs}
    kwargs.pop("weights", None)  # the weights come from MODEL_PATH, never from a download here
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"torchvision's '{name}' rejected MODEL_KWARGS {kwargs}: {exc}") from None


def _build_timm(name: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ConfigError(
            f"ARCH='timm:{name}' needs the timm package: run `pip install timm` (or choose another ARCH)."
        ) from None
    kwargs = {"num_classes": num_classes, "in_chans": in_channels, **kwargs}
    kwargs["pretrained"] = False  # the weights come from MODEL_PATH
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f" Did you mean {', '.join(repr('timm:' + c) for c in close)}?" if close else ""
            raise ConfigError(
                f"timm has no model '{name}'.{hint} List them with timm.list_models('*{name[:4]}*')."
            ) from None
        raise ConfigError(f"timm.create_model('{name}', **{kwargs}) failed: {exc}") from None
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(
            f"timm.create_model('{name}', **{kwargs}) failed: {exc}. Check MODEL_KWARGS."
        ) from None


def _build_from_file(file: Path, class_name: str, num_classes: int, in_channels: int,
                     kwargs: dict) -> nn.Module:
    path = file.expanduser().resolve()
    if not path.is_file():
        raise ConfigError(
            f"ARCH names the model file {path}, which does not exist. Use 'path/to/model.py:ClassName' "
            "with a path relative to the working directory or an absolute one."
        )
    module = _import_file(path)
    cls = getattr(module, class_name, None)
    if cls is None or not callable(cls):
        found = [n for n, v in vars(module).items()
                 if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == module.__name__]
        raise ConfigError(
            f"{path} has no class '{class_name}'. nn.Module classes defined there: {found or 'none'}. "
            f"Set ARCH='{file}:<one of them>'."
        )
    # Pass the dataset's sizes when the constructor takes them and the user did not set them.
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    call_kwargs = dict(kwargs)
    if "num_classes" in params and "num_classes" not in call_kwargs:
        call_kwargs["num_classes"] = num_classes
    if "in_channels" in params and "in_channels" not in call_kwargs:
        call_kwargs["in_channels"] = in_channels
    try:
        model = cls(**call_kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"{class_name}(**{call_kwargs}) failed: {exc}. Set MODEL_KWARGS to the arguments of "
            f"{class_name}{_signature_text(cls)}."
        ) from None
    except Exception as exc:  # the user's own constructor failed; show its error
        raise ModelLoadError(f"{class_name}(**{call_kwargs}) from {path} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{path}:{class_name} built a {type(model).__name__}, not a torch.nn.Module.")
    return model


def _signature_text(obj: Any) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _import_file(path: Path):
    """Import exactly this file (never a string as code) under a name unique to its path.
    Re-executed on every call, so edits to the file take effect on the next run of the notebook."""
    name = "gradcam_user_model_" + hashlib.sha1(str(path).encode()).hexdigest()[:10]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path} cannot be imported as a Python module; it must be a .py file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ModelLoadError(f"Importing the model file {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


@functools.lru_cache(maxsize=None)
def _builtin_keys(arch: str) -> frozenset:
    """State-dict keys of a built-in, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = BUILTIN_ARCHS[arch](num_classes=DEFAULT_NUM_CLASSES, in_channels=3)
    return frozenset(_comparable_keys(model.state_dict()))


def _comparable_keys(keys) -> set:
    # Older checkpoints lack BatchNorm's num_batches_tracked; load_state_dict fills it in.
    return {k for k in keys if not k.endswith("num_batches_tracked")}


def best_builtin_match(keys) -> tuple[Optional[str], float]:
    """The built-in architecture whose state-dict keys overlap most with `keys` (Jaccard index)."""
    ours = _comparable_keys(keys)
    best, best_score = None, 0.0
    for arch in BUILTIN_ARCHS:
        theirs = _builtin_keys(arch)
        union = len(ours | theirs)
        score = len(ours & theirs) / union if union else 0.0
        if score > best_score:
            best, best_score = arch, score
    return best, best_score


# ----------------------------------------------------------------------------------------------
# Reading checkpoint files

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_torchscript_file(path: Path) -> bool:
    """TorchScript archives are zip files with <root>/constants.pkl and <root>/code/."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False
    inner = [n.split("/", 1)[-1] for n in names]
    return any(n == "constants.pkl" or n.startswith("code/") for n in inner)


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)|Unsupported class ([\w.]+)")


def _unsafe_globals(message: str) -> Optional[str]:
    """The class/function a weights_only load refused, or None when the failure is not about globals."""
    match = _GLOBAL_RE.search(message)
    if match:
        return match.group(1) or match.group(2)
    if "unrecognized function" in message or "Unsupported global" in message:
        return "a Python object"
    return None


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # skip torch's generic preamble about weights_only
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = lines[0][:200] if lines else type(exc).__name__
    size = path.stat().st_size if path.exists() else 0
    return CheckpointError(
        f"The checkpoint {path} is corrupt or truncated ({size:,} bytes; torch.load said: {detail}). "
        "Copy or download it again, and check that it was written by torch.save (or safetensors)."
    )


def is_safetensors_file(path: Path) -> bool:
    """safetensors: 8-byte little-endian header length, then a JSON header."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def read_checkpoint(path: Path, allow_unsafe_pickle: bool = False) -> Any:
    """torch.load with weights_only=True; a full pickle only with the explicit opt-in.
    safetensors files (tensors only, no code) are read with the safetensors package."""
    if is_safetensors_file(path):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(f"{path} is a safetensors file: run `pip install safetensors` to read it.") from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise _corrupt(path, exc) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _unsafe_globals(str(exc))
        if refused is None:
            raise _corrupt(path, exc) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError... for damaged files
        raise _corrupt(path, exc) from None
    if not allow_unsafe_pickle:
        raise CheckpointError(
            f"The checkpoint {path} is a full pickled Python object (it references {refused}), not just "
            "weights. Unpickling it can execute arbitrary code from the file, so it was refused. If you "
            "trust its source, opt in with allow_unsafe_pickle=True (notebook parameter "
            "ALLOW_UNSAFE_PICKLE = True). Safer: re-save only the weights with "
            "torch.save(model.state_dict(), path) and set ARCH."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        raise CheckpointError(
            f"The pickled model in {path} refers to code that cannot be imported here ({exc}). Make the "
            "module that defines the class importable (e.g. add its folder to sys.path), or re-save with "
            "torch.save(model.state_dict(), path) and set ARCH='path/to/model.py:ClassName'."
        ) from None
    except Exception as exc:
        raise _corrupt(path, exc) from None


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def find_state_dict(obj: Any, depth: int = 0) -> tuple[Optional[dict], str]:
    """The state_dict inside a checkpoint and where it was: bare, or under a known key."""
    if _is_state_dict(obj):
        return dict(obj), "bare state_dict"
    if isinstance(obj, Mapping) and depth < 3:
        for key in STATE_DICT_KEYS:
            if key in obj:
                found, where = find_state_dict(obj[key], depth + 1)
                if found is not None:
                    return found, f"state_dict under '{key}'" + ("" if where == "bare state_dict" else f" / {where}")
    return None, ""


def strip_wrapper_prefixes(state_dict: dict) -> tuple[dict, list[str]]:
    """Remove 'module.' (DataParallel) and '_orig_mod.' (torch.compile) when every key has it."""
    stripped = []
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if state_dict and all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                stripped.append(prefix.rstrip("."))
                changed = True
    return state_dict, stripped


# ----------------------------------------------------------------------------------------------
# Fitting a state_dict to a model

def _head_name(model: nn.Module) -> Optional[str]:
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


def _first_layer(model: nn.Module) -> tuple[Optional[str], Optional[nn.Module]]:
    """The first registered Conv2d or Linear (usually, not always, the one that sees the input)."""
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return n, m
    return None, None


def _key_list(keys: Sequence[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:SHOW_KEYS])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > SHOW_KEYS else "")


def _without_common_prefix(state_dict: dict) -> Optional[dict]:
    """Lightning-style checkpoints prefix every key with the attribute name (e.g. 'model.');
    the keys without it, or None when the keys share no first component."""
    firsts = {k.split(".", 1)[0] for k in state_dict}
    if len(firsts) != 1 or not all("." in k for k in state_dict):
        return None
    prefix = next(iter(firsts)) + "."
    return {k[len(prefix):]: v for k, v in state_dict.items()}


def _maybe_strip_common_prefix(state_dict: dict, model_keys: set) -> dict:
    stripped = _without_common_prefix(state_dict)
    if stripped is not None and _comparable_keys(model_keys) <= set(stripped):
        return stripped
    return state_dict


def load_weights(model: nn.Module, state_dict: dict, arch: str, path: Path,
                 num_classes: int, in_channels: int) -> None:
    """Strict load with messages that say which keys/shapes differ and what to set instead."""
    expected = model.state_dict()
    state_dict = _maybe_strip_common_prefix(state_dict, set(expected))
    comparable = _comparable_keys(expected)
    missing = [k for k in expected if k in comparable and k not in state_dict]  # in model order
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys the model needs are missing from the checkpoint ({_key_list(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint keys are unexpected ({_key_list(unexpected)})")
        best, score = best_builtin_match(state_dict)
        if best is not None and best != arch and score >= 0.5:
            advice = (f"The checkpoint's keys best match the built-in architecture '{best}' "
                      f"({score:.0%} key overlap): try ARCH='{best}'.")
        else:
            closest = f" (closest built-in: '{best}', {score:.0%} key overlap)" if best else ""
            advice = ("Set ARCH to the architecture that produced the checkpoint" + closest + ": "
                      + describe_arch_choices() + ".")
        raise CheckpointError(
            f"The checkpoint {path} does not fit ARCH='{arch}': " + "; ".join(parts) + ". " + advice
        )
    head = _head_name(model)
    first_name, first = _first_layer(model)
    mismatched = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in expected.items()
                  if k in state_dict and state_dict[k].shape != v.shape]
    if mismatched:
        listed = "; ".join(f"{k}: checkpoint {c} vs model {m}" for k, c, m in mismatched[:SHOW_KEYS])
        hints = []
        for key, ckpt_shape, model_shape in mismatched:
            if head is not None and key == f"{head}.weight" and len(ckpt_shape) == 2:
                hints.append(
                    f"The checkpoint's classifier ({head}) has {ckpt_shape[0]} outputs but the model was built "
                    f"for num_classes={num_classes}: analyse it on a dataset with {ckpt_shape[0]} classes, or use "
                    f"a checkpoint trained for {num_classes} classes."
                )
            elif first_name is not None and key == f"{first_name}.weight" and len(ckpt_shape) >= 2 \
                    and ckpt_shape[1] != model_shape[1]:
                hints.append(
                    f"The checkpoint's first layer ({first_name}) takes {ckpt_shape[1]}-channel input but "
                    f"ARCH='{arch}' builds it for {model_shape[1]} channels and cannot be built otherwise here: "
                    f"set ARCH (and MODEL_KWARGS, e.g. {{'in_channels': {ckpt_shape[1]}}}) to the configuration the "
                    "checkpoint was trained with."
                )
            elif key == "conv1.weight" and len(ckpt_shape) == 4 and ckpt_shape[-1] == 7 and arch in BUILTIN_ARCHS:
                hints.append(
                    f"A 7x7 conv1 is torchvision's ImageNet stem; the built-in '{arch}' uses the 3x3 CIFAR stem: "
                    f"set ARCH='torchvision:{arch}'."
                )
        raise CheckpointError(
            f"The checkpoint {path} has {len(mismatched)} parameter(s) whose shapes differ from ARCH='{arch}': "
            f"{listed}. " + (" ".join(hints) if hints else
                             "Set ARCH (and MODEL_KWARGS) to the exact configuration the checkpoint was trained with.")
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"Loading {path} into ARCH='{arch}' failed: {exc}") from None


def _check_finite(model: nn.Module, where: str) -> None:
    floats = [(n, t) for n, t in model.state_dict().items()
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not floats:
        return
    # One batched max-abs pass (NaN/inf propagate, finite values cannot overflow); names only on failure.
    with torch.no_grad():
        peaks = torch.stack([p.float() for p in torch._foreach_norm([t for _, t in floats], float("inf"))])
    if bool(torch.isfinite(peaks).all()):
        return
    for name, tensor in floats:
        if not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"The weights from {where} contain NaN or infinite values (first: {name}); the model would "
                "produce meaningless predictions. Use an earlier or re-exported checkpoint."
            )


# ----------------------------------------------------------------------------------------------
# Public entry points

def load_model(
    model_path: Optional[str | os.PathLike] = None,
    arch: Optional[str] = None,
    num_classes: int = 100,
    in_channels: int = 3,
    device: str | torch.device = "cpu",
    allow_unsafe_pickle: bool = False,
    model_kwargs: Optional[dict] = None,
) -> LoadedModel:
    """The model to analyse, in eval mode on `device`, with forward returning logits.

    model_path None: the default CIFAR-100 ResNet-56 (downloaded once into the torch.hub cache).
    Otherwise a state_dict checkpoint (bare or under 'state_dict'/'model_state_dict'/'model'/'net',
    'module.' prefixes stripped; also .safetensors) for ARCH, which is inferred from the keys for
    built-ins when None; a TorchScript file; or, with allow_unsafe_pickle=True only, a fully pickled
    nn.Module. Raises SuiteError subclasses only, for anything the user can get wrong. The returned
    num_classes is what the model outputs; call check_model_fits_data to compare it with the data.
    """
    arch = arch.strip() if isinstance(arch, str) and arch.strip() else None
    if model_path is None or str(model_path).strip() == "":
        module, arch_used, source, digest = _load_default(arch, num_classes, in_channels)
    else:
        module, arch_used, source, digest, in_channels = _load_user(
            Path(model_path), arch, num_classes, in_channels, allow_unsafe_pickle, model_kwargs)
    module = _to_device(module.eval(), device)
    module, probed_classes = _probe_and_wrap(module, in_channels)
    return LoadedModel(
        module=module.eval(),
        arch=arch_used,
        source=source,
        weights_sha256=digest,
        num_classes=probed_classes if probed_classes is not None else num_classes,
        in_channels=in_channels,
    )


def _load_default(arch: Optional[str], num_classes: int, in_channels: int):
    if arch not in (None, DEFAULT_ARCH):
        raise ConfigError(
            f"ARCH='{arch}' needs MODEL_PATH: only the default {DEFAULT_ARCH} has downloadable weights, and "
            "a randomly initialised network would make the analysis meaningless. Set MODEL_PATH to your "
            "checkpoint, or leave ARCH empty to use the default CIFAR-100 ResNet-56."
        )
    if num_classes != DEFAULT_NUM_CLASSES:
        raise ConfigError(
            f"The default model is a CIFAR-100 classifier (100 classes) but the dataset has {num_classes} "
            "classes. Set MODEL_PATH (and ARCH) to a model trained on your dataset, or use DATASET='cifar100'."
        )
    if in_channels != 3:
        raise DataError(_channel_message(in_channels, 3))
    cache = default_model_cache_path()
    existed = cache.exists()
    try:
        state_dict = torch.hub.load_state_dict_from_url(
            DEFAULT_MODEL_URL, check_hash=True, map_location="cpu", weights_only=True)
    except Exception as exc:
        if existed or cache.exists():
            raise CheckpointError(
                f"The cached default model {cache} is corrupt or truncated ({type(exc).__name__}: "
                f"{str(exc)[:200]}). Delete it to download it again, or replace it with the file from "
                f"{DEFAULT_MODEL_URL}."
            ) from None
        raise ModelLoadError(
            f"Could not download the default model ({type(exc).__name__}: {str(exc)[:200]}). Without internet, "
            f"download {DEFAULT_MODEL_URL} elsewhere and place it at {cache} (the torch.hub cache; set "
            "TORCH_HOME to move it), or set MODEL_PATH to a checkpoint file."
        ) from None
    digest = sha256_file(cache)
    if digest != DEFAULT_MODEL_SHA256:
        raise CheckpointError(
            f"The cached default model {cache} is not the released file (sha256 {digest[:16]}..., expected "
            f"{DEFAULT_MODEL_SHA256[:16]}...). Delete it to download it again."
        )
    model = BUILTIN_ARCHS[DEFAULT_ARCH](num_classes=DEFAULT_NUM_CLASSES, in_channels=3)
    load_weights(model, state_dict, DEFAULT_ARCH, cache, num_classes, in_channels)
    source = f"default CIFAR-100 ResNet-56 (chenyaofo/pytorch-cifar-models) from {DEFAULT_MODEL_URL}, cached at {cache}"
    return model, DEFAULT_ARCH, source, digest


def _load_user(path: Path, arch: Optional[str], num_classes: int, in_channels: int,
               allow_unsafe_pickle: bool, model_kwargs: Optional[dict]):
    path = path.expanduser()
    absolute = path.resolve()
    if not absolute.exists():
        raise CheckpointError(
            f"MODEL_PATH {absolute} does not exist (given as '{path}', relative to {Path.cwd()}). Fix the "
            "path, or set MODEL_PATH = None to use the default CIFAR-100 ResNet-56."
        )
    if not absolute.is_file():
        raise CheckpointError(f"MODEL_PATH {absolute} is a folder; point it at the checkpoint file inside.")
    try:
        digest = sha256_file(absolute)
    except OSError as exc:
        raise CheckpointError(f"MODEL_PATH {absolute} cannot be read ({exc}). Check its permissions.") from None

    if is_torchscript_file(absolute):
        try:
            module = torch.jit.load(str(absolute), map_location="cpu")
        except Exception as exc:
            raise _corrupt(absolute, exc) from None
        _check_finite(module, str(absolute))
        return module, "torchscript", f"TorchScript file {absolute}", digest, in_channels

    obj = read_checkpoint(absolute, allow_unsafe_pickle)
    pickled = _pickled_module(obj)
    if pickled is not None:  # only reachable with allow_unsafe_pickle=True
        _check_finite(pickled, str(absolute))
        kind = f"pickled:{type(pickled).__module__}.{type(pickled).__qualname__}"
        return pickled, kind, f"full pickled model {absolute} (ALLOW_UNSAFE_PICKLE)", digest, in_channels

    state_dict, layout = find_state_dict(obj)
    if state_dict is None:
        what = (f"a dict with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, Mapping)
                else f"a {type(obj).__name__}")
        raise CheckpointError(
            f"The checkpoint {absolute} holds {what}, not a state_dict. Save the weights with "
            "torch.save(model.state_dict(), path), or nest them under 'state_dict'/'model_state_dict'/'model'/'net'."
        )
    state_dict, stripped = strip_wrapper_prefixes(state_dict)
    inferred = False
    if arch is None:
        best, score = best_builtin_match(state_dict)
        stripped_prefix = _without_common_prefix(state_dict)
        if score < 1.0 and stripped_prefix is not None and best_builtin_match(stripped_prefix)[1] == 1.0:
            state_dict = stripped_prefix
            best, score = best_builtin_match(state_dict)
        if best is None or score < 1.0:
            closest = f"the closest built-in is '{best}' with {score:.0%} key overlap" if best else "nothing is close"
            raise CheckpointError(
                f"Cannot infer the architecture of {absolute}: its keys ({_key_list(list(state_dict))}) match no "
                f"built-in exactly ({closest}). Set ARCH: {describe_arch_choices()}."
            )
        arch, inferred = best, True
    model = build_model(arch, num_classes, in_channels, model_kwargs)
    model, in_channels = _fit_input_channels(model, state_dict, arch, num_classes, in_channels, model_kwargs)
    load_weights(model, state_dict, arch, absolute, num_classes, in_channels)
    _check_finite(model, str(absolute))
    notes = [layout] + [f"'{p}.' prefix stripped" for p in stripped]
    notes.append(f"ARCH {'inferred' if inferred else 'given'}: {arch}")
    return model, arch, f"{absolute} ({', '.join(notes)})", digest, in_channels


def _checkpoint_in_channels(model: nn.Module, state_dict: dict) -> Optional[int]:
    """Input channels of the checkpoint's first convolution (the model's first registered layer),
    or None when that is not a plain Conv2d present in the checkpoint."""
    name, first = _first_layer(model)
    if not isinstance(first, nn.Conv2d) or first.groups != 1:
        return None
    weights = _maybe_strip_common_prefix(state_dict, set(model.state_dict())).get(f"{name}.weight")
    if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
        return None
    return int(weights.shape[1])


def _fit_input_channels(model: nn.Module, state_dict: dict, arch: str, num_classes: int, in_channels: int,
                        model_kwargs: Optional[dict]) -> tuple[nn.Module, int]:
    """The checkpoint, not the dataset, decides how many input channels the model has: rebuild a
    grayscale checkpoint's model for 1 channel (and the reverse) when ARCH can be built that way.
    A mismatch with the data is then reported by check_model_fits_data, which names CONVERT_CHANNELS."""
    wanted = _checkpoint_in_channels(model, state_dict)
    if wanted is None or wanted == in_channels:
        return model, in_channels
    try:
        rebuilt = build_model(arch, num_classes, wanted, model_kwargs)
    except SuiteError:  # e.g. torchvision models are RGB-only; load_weights explains the mismatch
        return model, in_channels
    name, first = _first_layer(rebuilt)
    if isinstance(first, nn.Conv2d) and first.in_channels == wanted:
        return rebuilt, wanted
    return model, in_channels  # the constructor ignores in_channels: load_weights explains


def _pickled_module(obj: Any) -> Optional[nn.Module]:
    """The nn.Module in a full pickle (bare or under a known key), without DataParallel."""
    candidate = obj
    if isinstance(obj, Mapping):
        candidate = next((obj[k] for k in STATE_DICT_KEYS if isinstance(obj.get(k), nn.Module)), None)
    if not isinstance(candidate, nn.Module):
        return None
    while isinstance(candidate, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        candidate = candidate.module
    return candidate


def _to_device(module: nn.Module, device: str | torch.device) -> nn.Module:
    from helpers.model.inference import resolve_device

    try:
        target = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        return module.to(target)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ConfigError(
            f"DEVICE='{device}' cannot be used here ({str(exc)[:160]}). Use DEVICE='auto' or 'cpu'."
        ) from None


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _probe_and_wrap(module: nn.Module, in_channels: int) -> tuple[nn.Module, Optional[int]]:
    """One forward on zeros: wrap models that do not return a tensor and measure the class count.
    A model that fails on both probe sizes is left as is; check_model_fits_data reports it
    with the real input shape."""
    device = _module_device(module)
    for height, width in PROBE_SIZES:
        try:
            with torch.no_grad():
                output = module(torch.zeros(1, in_channels, height, width, device=device))
        except Exception:
            continue
        if not isinstance(output, torch.Tensor):
            extract_logits(output)  # raises a clear error for outputs we cannot read
            module = LogitsWrapper(module)
            output = extract_logits(output)
        return module, int(output.shape[-1]) if output.dim() >= 1 else None
    return module, None


def _channel_message(data_channels: int, model_channels: int) -> str:
    kind = {1: "grayscale", 3: "RGB"}
    fix = "'rgb'" if model_channels == 3 else "'gray'" if model_channels == 1 else None
    text = (f"The data has {data_channels} channel{'s' if data_channels != 1 else ''} "
            f"({kind.get(data_channels, 'unusual')}) but the model expects {model_channels} "
            f"({kind.get(model_channels, 'unusual')}). ")
    if fix:
        return text + (f"Set CONVERT_CHANNELS={fix} (convert_channels={fix}) to convert the images, "
                       "or use a model trained on this kind of data.")
    return text + "Use a model trained on this kind of data."


def check_model_fits_data(loaded: LoadedModel, input_shape: Sequence[int], num_classes: int,
                          needs_cams: bool = True) -> LoadedModel:
    """Probe forward on zeros of `input_shape` (C, H, W): raises DataError for a channel mismatch
    and ConfigError when the output size differs from the dataset's class count. Wraps the module in
    LogitsWrapper if its output is not a tensor. With needs_cams (the analysis always needs them), a
    TorchScript model is refused here, before any compute, with the fix (cams.check_hookable).
    Returns `loaded` (updated in place)."""
    if needs_cams:
        from helpers.model.cams import check_hookable
        check_hookable(loaded.module, f"The model ({loaded.source})")
    channels, height, width = (int(v) for v in input_shape)
    probe = torch.zeros(1, channels, height, width, device=_module_device(loaded.module))
    try:
        with torch.no_grad():
            output = loaded.module(probe)
    except Exception as exc:
        # Registration order is not execution order, so the first conv only explains a failure.
        _, first = _first_layer(loaded.inner)
        if isinstance(first, nn.Conv2d) and first.in_channels != channels:
            raise DataError(_channel_message(channels, first.in_channels)) from None
        if channels != loaded.in_channels:
            raise DataError(_channel_message(channels, loaded.in_channels)) from None
        raise DataError(
            f"The model cannot process {height}x{width} images with {channels} channels "
            f"({type(exc).__name__}: {str(exc)[:200]}). It may expect another image size (timm ViTs: set "
            "MODEL_KWARGS={'img_size': ...}) or another number of channels (CONVERT_CHANNELS)."
        ) from None
    if not isinstance(output, torch.Tensor):
        extract_logits(output)
        loaded.module = LogitsWrapper(loaded.module)
        output = extract_logits(output)
    if output.dim() != 2 or output.shape[0] != 1:
        raise ConfigError(
            f"The model returns shape {tuple(output.shape)} for one image; a classifier must return "
            "(N, num_classes). Wrap it so that forward returns class scores."
        )
    produced = int(output.shape[1])
    if produced != num_classes:
        raise ConfigError(
            f"The model outputs {produced} classes but the dataset has {num_classes}. Use a checkpoint trained "
            f"on this dataset (MODEL_PATH/ARCH), or the dataset the model was trained on."
        )
    loaded.num_classes = produced
    loaded.in_channels = channels
    return loaded
