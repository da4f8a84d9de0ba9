"""A checkpoint file: read safely, identified (format, where its state_dict is, which built-in it matches) and
its weights fitted into a model, with errors that name the fix.

Checkpoints are always read with `torch.load(weights_only=True)`; a full pickled model (which can run
arbitrary code while loading) is only read with the explicit opt-in `allow_unsafe_pickle=True`. A TorchScript
archive is code too (its forward can call e.g. `torch.from_file(path, shared=True)`, which writes files): it is
recognised from its format, before anything in it is deserialised, and loaded only with the same opt-in.
"""
from __future__ import annotations

import functools
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from helpers.files.digest import file_digest
from helpers.errors import CheckpointError, ConfigError
from helpers.model.architectures import BUILTIN_ARCHS, describe_arch_choices
from helpers.model.layers import final_linear, first_layer, scripted_model_message

# Where a training script may have nested the state_dict inside the checkpoint dict.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")
# Wrappers whose prefixes are stripped: nn.DataParallel / DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SHOW_KEYS = 5


# ----------------------------------------------------------------------------------------------
# Reading checkpoint files

def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def is_torchscript_file(path: Path) -> bool:
    """TorchScript archives are zip files with <root>/constants.pkl and <root>/code/ (torch.load's own test is
    constants.pkl). Read from the zip directory only: nothing in the file is deserialised."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except Exception:   # not a zip Python can read; torch.load(weights_only=True) still refuses TorchScript
        return False
    inner = [n.split("/", 1)[-1] for n in names]
    return any(n == "constants.pkl" or n.startswith("code/") for n in inner)


def torchscript_refused(path: Path) -> CheckpointError:
    """The error for a TorchScript file without the opt-in: it is code, and CAMs could not use it anyway."""
    return CheckpointError(
        f"The checkpoint {path} is a TorchScript archive: loading it runs the compiled code it contains (its "
        "forward can read, write and create files), so it was refused before anything in it was read. "
        + scripted_model_message("Besides, a TorchScript model")
        + " If you trust its source and only want to load it (e.g. for its predictions), opt in with "
        "allow_unsafe_pickle=True (notebook parameter ALLOW_UNSAFE_PICKLE = True)."
    )


def read_torchscript(path: Path, allow_unsafe_pickle: bool = False) -> nn.Module:
    """torch.jit.load, only with the explicit opt-in (checked before the file is opened by torch)."""
    if not allow_unsafe_pickle:
        raise torchscript_refused(path)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise corrupt_checkpoint_error(path, exc) from None
    check_finite_weights(module, str(path))
    return module


def is_safetensors_file(path: Path) -> bool:
    """safetensors: 8-byte little-endian header length, then a JSON header."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)|Unsupported class ([\w.]+)")


def _unsafe_globals(message: str) -> Optional[str]:
    """The class/function a weights_only load refused, or None when the failure is not about globals."""
    match = _GLOBAL_RE.search(message)
    if match:
        return match.group(1) or match.group(2)
    if "unrecognized function" in message or "Unsupported global" in message:
        return "a Python object"
    return None


def corrupt_checkpoint_error(path: Path, exc: BaseException) -> CheckpointError:
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


def read_checkpoint(path: Path, allow_unsafe_pickle: bool = False) -> Any:
    """torch.load with weights_only=True; a full pickle only with the explicit opt-in.
    safetensors files (tensors only, no code) are read with the safetensors package."""
    if is_torchscript_file(path):   # torch.load(weights_only=False) would hand it to torch.jit.load
        if not allow_unsafe_pickle:
            raise torchscript_refused(path)
        raise CheckpointError(f"The checkpoint {path} is a TorchScript archive, not weights: load it with "
                              "load_model (MODEL_PATH), which reads TorchScript with the opt-in.")
    if is_safetensors_file(path):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(f"{path} is a safetensors file: run `pip install safetensors` to read it.") from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise corrupt_checkpoint_error(path, exc) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _unsafe_globals(str(exc))
        if refused is None:
            raise corrupt_checkpoint_error(path, exc) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError... for damaged files
        if "TorchScript" in str(exc) and not allow_unsafe_pickle:   # torch's own reader saw a TorchScript archive
            raise torchscript_refused(path) from None
        raise corrupt_checkpoint_error(path, exc) from None
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
        raise corrupt_checkpoint_error(path, exc) from None


def pickled_module(obj: Any) -> Optional[nn.Module]:
    """The nn.Module in a full pickle (bare or under a known key), without DataParallel."""
    candidate = obj
    if isinstance(obj, Mapping):
        candidate = next((obj[k] for k in STATE_DICT_KEYS if isinstance(obj.get(k), nn.Module)), None)
    if not isinstance(candidate, nn.Module):
        return None
    while isinstance(candidate, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        candidate = candidate.module
    return candidate


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
# Identifying the architecture from the keys

def comparable_keys(keys) -> set:
    # Older checkpoints lack BatchNorm's num_batches_tracked; load_state_dict fills it in.
    return {k for k in keys if not k.endswith("num_batches_tracked")}


@functools.lru_cache(maxsize=None)
def _builtin_keys(arch: str) -> frozenset:
    """State-dict keys of a built-in, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = BUILTIN_ARCHS[arch](in_channels=3)   # the keys do not depend on the class count
    return frozenset(comparable_keys(model.state_dict()))


def best_builtin_match(keys) -> tuple[Optional[str], float]:
    """The built-in architecture whose state-dict keys overlap most with `keys` (Jaccard index)."""
    ours = comparable_keys(keys)
    best, best_score = None, 0.0
    for arch in BUILTIN_ARCHS:
        theirs = _builtin_keys(arch)
        union = len(ours | theirs)
        score = len(ours & theirs) / union if union else 0.0
        if score > best_score:
            best, best_score = arch, score
    return best, best_score


def without_common_prefix(state_dict: dict) -> Optional[dict]:
    """Lightning-style checkpoints prefix every key with the attribute name (e.g. 'model.');
    the keys without it, or None when the keys share no first component."""
    firsts = {k.split(".", 1)[0] for k in state_dict}
    if len(firsts) != 1 or not all("." in k for k in state_dict):
        return None
    prefix = next(iter(firsts)) + "."
    return {k[len(prefix):]: v for k, v in state_dict.items()}


def strip_common_prefix(state_dict: dict, model_keys: set) -> dict:
    """The state_dict without its common prefix when only that way it holds every key of the model."""
    stripped = without_common_prefix(state_dict)
    if stripped is not None and comparable_keys(model_keys) <= set(stripped):
        return stripped
    return state_dict


# ----------------------------------------------------------------------------------------------
# Fitting a state_dict to a model

def describe_keys(keys: Sequence[str]) -> str:
    """The first few keys, for a message."""
    keys = list(keys)
    shown = ", ".join(keys[:SHOW_KEYS])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > SHOW_KEYS else "")


def load_weights(model: nn.Module, state_dict: dict, arch: str, path: Path,
                 num_classes: int, in_channels: int) -> None:
    """Strict load with messages that say which keys/shapes differ and what to set instead."""
    expected = model.state_dict()
    state_dict = strip_common_prefix(state_dict, set(expected))
    comparable = comparable_keys(expected)
    missing = [k for k in expected if k in comparable and k not in state_dict]  # in model order
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys the model needs are missing from the checkpoint ({describe_keys(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint keys are unexpected ({describe_keys(unexpected)})")
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
    head_module = final_linear(model)
    head = next((n for n, m in model.named_modules() if m is head_module), None)
    first_name, _ = first_layer(model)
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


def check_finite_weights(model: nn.Module, where: str) -> None:
    """CheckpointError naming the first parameter or buffer with NaN/inf values."""
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
