"""Load the classifier to analyse: the default CIFAR-100 ResNet-56 or a user's checkpoint.

Every failure a user can cause becomes a SuiteError subclass whose message names the fix.
Checkpoints are always read with `torch.load(weights_only=True)` (checkpoint.py); a full pickled model
(which can run arbitrary code while loading) and a TorchScript archive (compiled code, refused from its format
before torch.jit.load sees it) are only accepted with the explicit opt-in `allow_unsafe_pickle=True` (notebook
parameter ALLOW_UNSAFE_PICKLE). Nothing here reaches the network except the default model's download and,
with download=True (DOWNLOAD), a timm Hugging Face Hub name's config.

Target layers for Grad-CAM are dotted paths relative to the *inner* model, `unwrap(loaded.module)`:
when the model's forward returns something other than a tensor it is wrapped in `LogitsWrapper`,
whose `model` attribute is the original network.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import urlparse

import torch
from torch import nn

from helpers.errors import CheckpointError, ConfigError, DataError, ModelLoadError, SuiteError
from helpers.model.architectures import BUILTIN_ARCHS, describe_arch_choices
from helpers.model.checkpoint import (best_builtin_match, check_finite_weights, describe_keys, find_state_dict,
                                      is_torchscript_file, load_weights, pickled_module, read_checkpoint,
                                      read_torchscript, sha256_file, strip_common_prefix, strip_wrapper_prefixes,
                                      without_common_prefix)
from helpers.model.layers import check_hookable, dtype_hint, first_layer, float32_model, model_device

DEFAULT_MODEL_URL = (
    "https://github.com/chenyaofo/pytorch-cifar-models/releases/download/resnet/cifar100_resnet56-f2eff4c8.pt"
)
DEFAULT_ARCH = "resnet56"
DEFAULT_MODEL_FILENAME = os.path.basename(urlparse(DEFAULT_MODEL_URL).path)
DEFAULT_MODEL_SHA256 = "f2eff4c8461ca1e0d39af83a65f7243bf7d29ec421efee3064bcee93a3caaa73"
DEFAULT_NUM_CLASSES = 100

# Input sizes tried by the probe forward in load_model (CIFAR-sized first, then ImageNet-sized).
PROBE_SIZES = ((32, 32), (224, 224))


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


# ----------------------------------------------------------------------------------------------
# Building architectures

def _torchvision_names() -> list[str]:
    import torchvision

    # Only the classification models live at the top level of torchvision.models.
    return list(torchvision.models.list_models(module=torchvision.models))


def build_model(arch: str, num_classes: int = 100, in_channels: int = 3,
                model_kwargs: Optional[dict] = None, download: bool = True) -> nn.Module:
    """A randomly initialised network for an ARCH string (see describe_arch_choices). Never downloads weights
    (they come from MODEL_PATH); download=False also refuses timm Hub names, whose config is fetched."""
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
        return _build_timm(name[len("timm:"):], num_classes, in_channels, kwargs, download)
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
    _refuse_weight_kwargs(f"torchvision:{name}", kwargs, {"weights": None, "weights_backbone": None})
    kwargs = {"num_classes": num_classes, **kwargs}
    kwargs.pop("weights", None)  # the weights come from MODEL_PATH, never from a download here
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"torchvision's '{name}' rejected MODEL_KWARGS {kwargs}: {exc}") from None


# timm model-name prefixes that fetch the model's config from the Hugging Face Hub (timm's parse_model_name).
TIMM_HUB_PREFIXES = ("hf-hub:", "hf_hub:")


def _refuse_weight_kwargs(arch: str, kwargs: dict, harmless: dict) -> None:
    """ConfigError for MODEL_KWARGS that would fetch or load weights besides MODEL_PATH's (a download, or
    another file read outside checkpoint.py's safe reader). `harmless`: each such key's value that asks nothing."""
    for key, ok in harmless.items():
        value = kwargs.get(key)
        if value is not None and value is not False and value != ok and value != "":
            raise ConfigError(
                f"MODEL_KWARGS {key}={value!r} would make ARCH='{arch}' download or load weights of its own; "
                f"the weights come from MODEL_PATH only (read safely, never downloaded). Remove '{key}' from "
                "MODEL_KWARGS.")


def _timm_hub_name(name: str) -> bool:
    return name.strip().lower().startswith(TIMM_HUB_PREFIXES)


def _build_timm(name: str, num_classes: int, in_channels: int, kwargs: dict, download: bool = True) -> nn.Module:
    hub = _timm_hub_name(name)
    if hub and not download:   # refused before timm is imported: timm would fetch the config right away
        raise ConfigError(
            f"ARCH='timm:{name}' names a model on the Hugging Face Hub: building it downloads the model's config "
            "from the network, and DOWNLOAD is False. Set DOWNLOAD = True (download=True) to allow it, or use the "
            "timm registry name of the architecture instead (ARCH='timm:<name>'; list them with timm.list_models())."
        )
    _refuse_weight_kwargs(f"timm:{name}", kwargs, {"pretrained": False, "checkpoint_path": None})
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
            try:
                close = difflib.get_close_matches(name, timm.list_models(), n=3)
            except Exception:
                close = []
            hint = f" Did you mean {', '.join(repr('timm:' + c) for c in close)}?" if close else ""
            raise ConfigError(
                f"timm has no model '{name}'.{hint} List them with timm.list_models('*{name[:4]}*')."
            ) from None
        raise ConfigError(f"timm.create_model('{name}', **{kwargs}) failed: {exc}") from None
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(
            f"timm.create_model('{name}', **{kwargs}) failed: {exc}. Check ARCH and MODEL_KWARGS."
        ) from None
    except Exception as exc:  # Hub and file errors (LocalEntryNotFoundError, OSError, HTTP errors...), anything else
        where = ("could not fetch the model's config from the Hugging Face Hub" if hub
                 else "failed")
        fix = ("Check the network and the repository name, or use the timm registry name of the architecture "
               "(ARCH='timm:<name>'; list them with timm.list_models())." if hub
               else "Check ARCH and MODEL_KWARGS.")
        raise ConfigError(
            f"timm.create_model('{name}') {where} ({type(exc).__name__}: {str(exc)[:200]}). {fix}"
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
    download: bool = True,
) -> LoadedModel:
    """The model to analyse, in eval mode on `device`, with forward returning logits.

    model_path None: the default CIFAR-100 ResNet-56 (downloaded once into the torch.hub cache).
    Otherwise a state_dict checkpoint (bare or under 'state_dict'/'model_state_dict'/'model'/'net',
    'module.' prefixes stripped; also .safetensors) for ARCH, which is inferred from the keys for
    built-ins when None; or, with allow_unsafe_pickle=True only, a TorchScript file or a fully pickled
    nn.Module (both are code, refused before they are deserialised). download=False (DOWNLOAD) refuses ARCH names
    that fetch from the network (timm's 'hf-hub:'). Raises SuiteError subclasses only, for anything the user can
    get wrong. The returned num_classes is what the model outputs; call check_model_fits_data to compare it with
    the data.
    """
    arch = arch.strip() if isinstance(arch, str) and arch.strip() else None
    if model_path is None or str(model_path).strip() == "":
        module, arch_used, source, digest = _load_default(arch, num_classes, in_channels)
    else:
        module, arch_used, source, digest, in_channels = _load_user(
            Path(model_path), arch, num_classes, in_channels, allow_unsafe_pickle, model_kwargs, download)
    module = _to_device(module.eval(), device)
    module, dtype_note = float32_model(module, [torch.zeros(1, in_channels, h, w, device=model_device(module))
                                                for h, w in PROBE_SIZES])
    source = f"{source} [{dtype_note}]" if dtype_note else source
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
               allow_unsafe_pickle: bool, model_kwargs: Optional[dict], download: bool = True):
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

    if is_torchscript_file(absolute):   # from the zip directory: refused before torch.jit.load runs anything
        module = read_torchscript(absolute, allow_unsafe_pickle)
        return module, "torchscript", f"TorchScript file {absolute} (ALLOW_UNSAFE_PICKLE)", digest, in_channels

    obj = read_checkpoint(absolute, allow_unsafe_pickle)
    pickled = pickled_module(obj)
    if pickled is not None:  # only reachable with allow_unsafe_pickle=True
        check_finite_weights(pickled, str(absolute))
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
        stripped_prefix = without_common_prefix(state_dict)
        if score < 1.0 and stripped_prefix is not None and best_builtin_match(stripped_prefix)[1] == 1.0:
            state_dict = stripped_prefix
            best, score = best_builtin_match(state_dict)
        if best is None or score < 1.0:
            closest = f"the closest built-in is '{best}' with {score:.0%} key overlap" if best else "nothing is close"
            raise CheckpointError(
                f"Cannot infer the architecture of {absolute}: its keys ({describe_keys(list(state_dict))}) match no "
                f"built-in exactly ({closest}). Set ARCH: {describe_arch_choices()}."
            )
        arch, inferred = best, True
    model = build_model(arch, num_classes, in_channels, model_kwargs, download)
    model, in_channels = _fit_input_channels(model, state_dict, arch, num_classes, in_channels, model_kwargs,
                                             download)
    load_weights(model, state_dict, arch, absolute, num_classes, in_channels)
    check_finite_weights(model, str(absolute))
    notes = [layout] + [f"'{p}.' prefix stripped" for p in stripped]
    notes.append(f"ARCH {'inferred' if inferred else 'given'}: {arch}")
    return model, arch, f"{absolute} ({', '.join(notes)})", digest, in_channels


def _checkpoint_in_channels(model: nn.Module, state_dict: dict) -> Optional[int]:
    """Input channels of the checkpoint's first convolution (the model's first registered layer),
    or None when that is not a plain Conv2d present in the checkpoint."""
    name, first = first_layer(model)
    if not isinstance(first, nn.Conv2d) or first.groups != 1:
        return None
    weights = strip_common_prefix(state_dict, set(model.state_dict())).get(f"{name}.weight")
    if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
        return None
    return int(weights.shape[1])


def _fit_input_channels(model: nn.Module, state_dict: dict, arch: str, num_classes: int, in_channels: int,
                        model_kwargs: Optional[dict], download: bool = True) -> tuple[nn.Module, int]:
    """The checkpoint, not the dataset, decides how many input channels the model has: rebuild a
    grayscale checkpoint's model for 1 channel (and the reverse) when ARCH can be built that way.
    A mismatch with the data is then reported by check_model_fits_data, which names CONVERT_CHANNELS."""
    wanted = _checkpoint_in_channels(model, state_dict)
    if wanted is None or wanted == in_channels:
        return model, in_channels
    try:
        rebuilt = build_model(arch, num_classes, wanted, model_kwargs, download)
    except SuiteError:  # e.g. torchvision models are RGB-only; load_weights explains the mismatch
        return model, in_channels
    name, first = first_layer(rebuilt)
    if isinstance(first, nn.Conv2d) and first.in_channels == wanted:
        return rebuilt, wanted
    return model, in_channels  # the constructor ignores in_channels: load_weights explains


def _to_device(module: nn.Module, device: str | torch.device) -> nn.Module:
    from helpers.model.inference import resolve_device

    try:
        target = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        return module.to(target)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ConfigError(
            f"DEVICE='{device}' cannot be used here ({str(exc)[:160]}). Use DEVICE='auto' or 'cpu'."
        ) from None


def _probe_and_wrap(module: nn.Module, in_channels: int) -> tuple[nn.Module, Optional[int]]:
    """One forward on zeros: wrap models that do not return a tensor and measure the class count.
    A model that fails on both probe sizes is left as is; check_model_fits_data reports it
    with the real input shape."""
    device = model_device(module)
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
    TorchScript model is refused here, before any compute, with the fix (layers.check_hookable).
    Returns `loaded` (updated in place)."""
    if needs_cams:
        check_hookable(loaded.module, f"The model ({loaded.source})")
    channels, height, width = (int(v) for v in input_shape)
    probe = torch.zeros(1, channels, height, width, device=model_device(loaded.module))
    try:
        with torch.no_grad():
            output = loaded.module(probe)
    except Exception as exc:
        # Registration order is not execution order, so the first conv only explains a failure.
        _, first = first_layer(loaded.inner)
        if isinstance(first, nn.Conv2d) and first.in_channels != channels:
            raise DataError(_channel_message(channels, first.in_channels)) from None
        if channels != loaded.in_channels:
            raise DataError(_channel_message(channels, loaded.in_channels)) from None
        if dtype_hint(loaded.module, exc):
            raise ConfigError(dtype_hint(loaded.module, exc)) from None
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
