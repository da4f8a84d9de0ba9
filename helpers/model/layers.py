"""Reading a model's structure: its target layer for CAMs, its classifier head, its device, and what its
forward pass does (a probe pass with forward hooks on zeros).

Target layers are dotted paths in `model.named_modules()`. For CNNs the natural layer is the block that
produces the last spatial feature map; for ViTs (timm or torchvision) it is the first LayerNorm of the last
transformer block, whose (B, T, D) tokens `vit_reshape_transform` turns into a (B, D, g, g) map; for Swin and
other windowed transformers it is the last block's norm2, whose channels-last maps or (B, H*W, C) tokens
`swin_reshape_transform` turns into (B, C, H, W).
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from helpers.errors import ConfigError


@dataclass
class ModuleCall:
    """One module's call in a probe forward pass."""
    name: str
    module: nn.Module
    order: int          # completion order of this call in the forward pass
    output: object      # what the module returned (kept alive so `is` comparisons stay valid)
    inputs: tuple


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def final_linear(model: nn.Module, num_classes: Optional[int] = None) -> Optional[nn.Linear]:
    """The classifier head: the last nn.Linear registered in model.modules() (with out_features == num_classes
    when given), or None. Registration order matches execution order for ordinary classifiers."""
    head = None
    for module in model.modules():
        if isinstance(module, nn.Linear) and (num_classes is None or module.out_features == num_classes):
            head = module
    return head


def first_layer(model: nn.Module) -> tuple[Optional[str], Optional[nn.Module]]:
    """The first registered Conv2d or Linear (usually, not always, the one that sees the input)."""
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return n, m
    return None, None


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for a probe (BatchNorm would fail on batch 1), restoring each module's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# ----------------------------------------------------------------------------- TorchScript

def _scripted_names(model: nn.Module) -> list[str]:
    """Names of the TorchScript modules in `model` ("" for the root)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]


def _inside_script(name: str, scripted: Sequence[str]) -> bool:
    return any(s == "" or name == s or name.startswith(s + ".") for s in scripted)


def scripted_model_message(what: str = "The model") -> str:
    return (f"{what} is TorchScript: its forward pass is compiled code that does not call Python forward hooks, "
            "and every CAM method needs the activations of an inner layer, so CAMs cannot be computed from it. "
            "Use the eager (Python) model instead: where the network is defined, save its weights with "
            "torch.save(model.state_dict(), 'weights.pt'), then set MODEL_PATH='weights.pt' and ARCH to its "
            "architecture (a built-in or torchvision name, 'timm:<name>', or 'path/to/model.py:ClassName').")


def check_hookable(model: nn.Module, what: str = "The model") -> None:
    """ConfigError naming the fix when the network's forward is TorchScript: the root is scripted, or every
    child is (e.g. a LogitsWrapper around a loaded TorchScript file). Partly scripted models are fine as long
    as the target layer is eager Python."""
    children = list(model.children())
    if isinstance(model, torch.jit.ScriptModule) or (
            children and all(isinstance(c, torch.jit.ScriptModule) for c in children)):
        raise ConfigError(scripted_model_message(what))


# ----------------------------------------------------------------------------- probe pass

def probe(model: nn.Module, x: torch.Tensor, only: Optional[Sequence[nn.Module]] = None):
    """Run `model(x)` in eval mode without gradients, with forward hooks on every non-root module (or just
    `only`). Returns (ModuleCalls in completion order, model output). TorchScript modules and their insides
    are skipped: torch refuses hooks on them (check_hookable explains what to do)."""
    names = {id(m): n for n, m in model.named_modules()}
    scripted = _scripted_names(model)
    watched = ([m for n, m in model.named_modules() if n and not _inside_script(n, scripted)]
               if only is None else list(only))
    calls: list[ModuleCall] = []

    def hook(module, inputs, output):
        calls.append(ModuleCall(names.get(id(module), "?"), module, len(calls), output, inputs))

    handles = [m.register_forward_hook(hook) for m in watched]
    try:
        with eval_mode(model), torch.no_grad():
            out = model(x.to(model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return calls, out


def check_input_shape(input_shape) -> None:
    if len(tuple(input_shape)) != 3:
        raise ConfigError(f"input_shape must be (C, H, W); got {tuple(input_shape)}.")


def probe_input(input_shape: Sequence[int], batch: int = 1) -> torch.Tensor:
    """Zeros of shape (batch, C, H, W) for a probe pass."""
    check_input_shape(input_shape)
    return torch.zeros((batch,) + tuple(int(s) for s in input_shape))


def saved_bytes_per_image(model: nn.Module, input_shape: Sequence[int], device="cpu") -> int:
    """Bytes autograd keeps for the backward pass of one more image (a batch of 2 against a batch of 1, so the
    weights each layer saves once per call do not count): what a library CAM batch holds per image."""
    sizes = []
    for batch in (1, 2):
        total = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            total[0] += t.numel() * t.element_size()
            return t
        x = probe_input(input_shape, batch).to(device).requires_grad_(True)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        sizes.append(total[0])
    return max(1, sizes[1] - sizes[0])


def _is_spatial_map(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[2] * t.shape[3] > 1


def _is_feature_map(call: ModuleCall) -> bool:
    """A 4-D map larger than 1x1 that the module computed; adaptive pools that keep or enlarge the map
    (torchvision VGG's AdaptiveAvgPool2d(7) after a 1x1 or 7x7 map) only copy values and are skipped."""
    if not _is_spatial_map(call.output):
        return False
    if isinstance(call.module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and call.inputs:
        src = call.inputs[0]
        if isinstance(src, torch.Tensor) and src.dim() == 4 and call.output.shape[2:] >= src.shape[2:]:
            return False
    return True


# ----------------------------------------------------------------------------- target layer

_STAGES = (nn.Sequential, nn.ModuleList)


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


def _find_vit(model: nn.Module):
    """(ViT module, its transformer blocks, name of the norm to hook in a block) or None.
    timm VisionTransformer-like: `blocks` + `patch_embed`, blocks with `norm1`/`attn`
    (the `patch_embed` test keeps Swin stages, whose blocks emit (B,H,W,C), out).
    torchvision VisionTransformer: `encoder.layers`, blocks with `ln_1`/`self_attention`."""
    for _, m in model.named_modules():
        blocks = getattr(m, "blocks", None)
        if (isinstance(blocks, _STAGES) and len(blocks) and hasattr(m, "patch_embed")
                and hasattr(blocks[-1], "norm1") and hasattr(blocks[-1], "attn")):
            return m, blocks, "norm1"
        layers = getattr(getattr(m, "encoder", None), "layers", None)
        if (isinstance(layers, _STAGES) and len(layers) and hasattr(layers[-1], "ln_1")
                and hasattr(layers[-1], "self_attention")):
            return m, layers, "ln_1"
    return None


def _vit_norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = _find_vit(model)
    if found is None:
        return []
    names = {id(m): n for n, m in model.named_modules()}
    _, blocks, norm = found
    return [(names[id(getattr(b, norm))], getattr(b, norm)) for b in blocks]


def _is_swin_block(module: nn.Module) -> bool:
    """A windowed-attention transformer block: `norm1`, `norm2` and an `attn` that attends within windows
    (timm's WindowAttention and torchvision's ShiftedWindowAttention, V1 and V2, both carry `window_size`)."""
    return (isinstance(getattr(module, "norm1", None), nn.Module)
            and isinstance(getattr(module, "norm2", None), nn.Module)
            and isinstance(getattr(module, "attn", None), nn.Module) and hasattr(module.attn, "window_size"))


def _swin_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every windowed-attention block, in registration order, which is forward order for timm and
    torchvision Swin; [] for ViTs (BEiT-style attention also carries a `window_size`, for its position bias)."""
    if _find_vit(model) is not None:
        return []
    return [(n, m) for n, m in model.named_modules() if n and _is_swin_block(m)]


def _swin_norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, norm2) of every Swin block. norm2, not norm1: its input is the residual stream after the shifted-window
    attention has mixed the windows, and torchcam found its CAMs better than norm1's on Swin-T (torchcam PR #412);
    in V2's post-norm blocks it normalises the MLP branch, still the last per-block layer before the head."""
    return [(f"{name}.norm2", block.norm2) for name, block in _swin_blocks(model)]


def _spatial_candidates(model: nn.Module, input_shape, max_depth: int) -> list[str]:
    """Modules producing 4-D feature maps, in execution order, at most `max_depth` dots deep
    (deeper sub-layers are valid too, but listing every conv and BatchNorm buries the useful names)."""
    calls, _ = probe(model, probe_input(input_shape))
    seen, names = set(), []
    for c in calls:
        if _is_feature_map(c) and c.name not in seen and c.name.count(".") <= max_depth:
            seen.add(c.name)
            names.append(c.name)
    return names


def find_target_layer(model: nn.Module, input_shape: Sequence[int] = (3, 32, 32)) -> tuple[str, nn.Module]:
    """The natural Grad-CAM layer, as (dotted name in `model.named_modules()`, module).

    ViTs (timm or torchvision): the first LayerNorm of the last transformer block.
    Swin and other windowed transformers (timm or torchvision): the last block's norm2 (_swin_norm_layers says why).
    CNNs: the module whose output is the last 4-D map with more than one spatial position
    produced in a probe forward pass (i.e. the last map before global pooling). Several modules
    can return that same tensor (a stage, its last block, the block's final ReLU); the block
    is reported: the outermost non-Sequential module whose parent is a Sequential/ModuleList stage,
    e.g. `layer3.8` for a CIFAR ResNet-56, `layer4.1` for a ResNet-18, `features.N` for VGG."""
    check_hookable(model)
    vit = _vit_norm_layers(model) or _swin_norm_layers(model)
    if vit:
        return vit[-1]
    calls, _ = probe(model, probe_input(input_shape))
    maps = [c for c in calls if _is_feature_map(c)]
    if not maps:
        scripted = _scripted_names(model)
        why = (f" The TorchScript parts ({', '.join(scripted[:3])}) cannot be hooked: build them as eager "
               "Python modules." if scripted else "")
        raise ConfigError(f"No layer of the model outputs a 4-D feature map larger than 1x1 for input shape "
                          f"{tuple(input_shape)}; set TARGET_LAYER to a layer name explicitly.{why}")
    last = maps[-1].output
    same = {c.name: c for c in calls if c.output is last}.values()

    def depth(c: ModuleCall) -> int:
        return c.name.count(".")

    blocks = [c for c in same if not isinstance(c.module, _STAGES)
              and isinstance(_parent(model, c.name), _STAGES)]
    pool = blocks or [c for c in same if not isinstance(c.module, _STAGES)] or list(same)
    # Same depth: the module that ran last produced the final values (an in-place ReLU after its conv).
    best = min(pool, key=lambda c: (depth(c), -c.order))
    return best.name, best.module


def _walk(root: nn.Module, parts: list[str]) -> Optional[nn.Module]:
    m = root
    for p in parts:
        child = getattr(m, p, None)   # a registered child by name ("layer4", "0"); None-valued slots are no layer
        if isinstance(child, nn.Module):
            m = child
        elif re.fullmatch(r"-?\d+", p) and isinstance(m, _STAGES) and -len(m) <= int(p) < len(m):
            m = m[int(p)]   # positional, so "layer4.-1" works too
        else:
            return None
    return m


def _candidates_text(model: nn.Module, input_shape) -> str:
    vit = [n for n, _ in _vit_norm_layers(model)]
    if vit:
        return f"Candidate layers (ViT block norms; the default is the last): {', '.join(vit)}."
    swin = [n for n, _ in _swin_norm_layers(model)]
    if swin:
        return f"Candidate layers (Swin block norm2s; the default is the last): {', '.join(swin)}."
    try:
        default = find_target_layer(model, input_shape)[0]
    except ConfigError:
        default = ""
    cands = _spatial_candidates(model, input_shape, max_depth=max(default.count("."), 1))
    shown = cands if len(cands) <= 60 else ["..."] + cands[-60:]
    return (f"Candidate layers (4-D feature maps, in forward order; default {default or 'none'}; their "
            f"sub-layers work too): {', '.join(shown) or '(none)'}.")


def resolve_target_layer(model: nn.Module, spec: Optional[str],
                         input_shape: Sequence[int] = (3, 32, 32)) -> tuple[str, nn.Module]:
    """(canonical dotted name, module) for a user's layer spec.

    None/"" -> find_target_layer. Otherwise a dotted path ("layer4.1", "features.12", also
    "layer4[-1]" or "layer4.-1"); numeric parts index into Sequential/ModuleList stages. For a
    wrapper exposing the real network as `.model`, paths with or without the "model." prefix work.
    Unknown paths raise ConfigError listing the candidate layers."""
    if spec is None or not str(spec).strip():
        return find_target_layer(model, input_shape)
    check_hookable(model)
    text = str(spec).strip()
    parts = re.sub(r"\[(-?\d+)\]", r".\1", text).strip(".").split(".")
    module = _walk(model, parts)
    inner = getattr(model, "model", None)
    if module is None and isinstance(inner, nn.Module):
        module = _walk(inner, parts)
    names = {id(m): n for n, m in model.named_modules()}
    if module is None or module is model:
        raise ConfigError(f"Target layer {text!r} not found in the model. {_candidates_text(model, input_shape)}")
    name = names[id(module)]
    if _inside_script(name, _scripted_names(model)):
        raise ConfigError(f"Target layer {name!r} is inside a TorchScript module, which cannot be hooked; pick a "
                          f"layer of the eager (Python) part of the model. {_candidates_text(model, input_shape)}")
    calls, _ = probe(model, probe_input(input_shape), only=[module])
    if not calls:
        raise ConfigError(f"Target layer {name!r} is not used in the model's forward pass; pick another layer.")
    out = calls[-1].output
    if not (isinstance(out, torch.Tensor) and out.dim() in (3, 4)):
        raise ConfigError(f"Target layer {name!r} does not output a 4-D feature map or 3-D token tensor "
                          f"(got {type(out).__name__} {tuple(getattr(out, 'shape', ()))}); pick another layer.")
    return name, module


def target_layer_choices(model: nn.Module, input_shape: Sequence[int], k: int = 4) -> list[str]:
    """A few sensible CAM layers, late to early: the automatic layer first, then the last layer of each
    earlier resolution stage (e.g. layer3.8, layer2.8, layer1.8 for a CIFAR ResNet-56); for a ViT, block
    norms spread over the depth; for a Swin, the norm2 of each stage's last block (each stage halves the
    resolution). Later layers are more semantic and coarser; earlier ones sharper."""
    vit = [name for name, _ in _vit_norm_layers(model)]
    if vit:
        picks = np.unique(np.linspace(len(vit) - 1, 0, num=min(k, len(vit))).round().astype(int))[::-1]
        return [vit[i] for i in picks]
    swin = _swin_norm_layers(model)
    if swin:
        last_per_stage = {name.rsplit(".", 2)[0]: name for name, _ in swin}   # stage = the blocks' container
        return list(reversed(list(last_per_stage.values())))[:k]
    default = find_target_layer(model, input_shape)[0]
    depth = max(default.count("."), 1)
    calls, _ = probe(model, probe_input(input_shape))
    last_of_size: dict[tuple[int, int], str] = {}
    for c in calls:   # completion order: the last writer per resolution ends that stage
        if _is_feature_map(c) and c.name.count(".") <= depth and not isinstance(c.module, _STAGES):
            last_of_size.pop(tuple(c.output.shape[2:]), None)
            last_of_size[tuple(c.output.shape[2:])] = c.name
    ordered = [default] + [n for n in reversed(list(last_of_size.values())) if n != default]
    return ordered[:k]


# ----------------------------------------------------------------------------- ViT reshape

def _num_prefix_tokens(model: nn.Module, tokens: int) -> int:
    for m in model.modules():
        n = getattr(m, "num_prefix_tokens", None)
        if isinstance(n, int):
            return n        # timm: CLS + register/distillation tokens
    for m in model.modules():
        if isinstance(getattr(m, "class_token", None), torch.Tensor):
            return 1        # torchvision VisionTransformer
    return tokens - math.isqrt(tokens) ** 2


def vit_reshape_transform(model: nn.Module, input_shape: Sequence[int] = (3, 32, 32),
                          layer: Optional[nn.Module] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """reshape_transform for a ViT layer: (B, T, D) tokens -> (B, D, g, g) map.

    The prefix-token count (CLS, registers, distillation) comes from timm's `num_prefix_tokens`,
    torchvision's class token, or else T minus the largest square <= T; g is the integer square root of
    the remaining patch tokens, checked to be exact on a probe pass (no hard-coded 14x14)."""
    if layer is None:
        norms = _vit_norm_layers(model)
        if not norms:
            raise ConfigError("vit_reshape_transform needs a ViT (timm or torchvision) or an explicit layer.")
        layer = norms[-1][1]
    calls, _ = probe(model, probe_input(input_shape), only=[layer])
    out = calls[-1].output if calls else None
    if not (isinstance(out, torch.Tensor) and out.dim() == 3):
        raise ConfigError(f"The chosen layer does not output (batch, tokens, dim) tokens; got "
                          f"{tuple(getattr(out, 'shape', ()))}.")
    tokens = int(out.shape[1])
    prefix = _num_prefix_tokens(model, tokens)
    grid = math.isqrt(max(tokens - prefix, 0))
    if grid < 1 or grid * grid != tokens - prefix:
        raise ConfigError(f"Cannot reshape {tokens} tokens ({prefix} prefix tokens) into a square patch grid.")

    def reshape(t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        g = math.isqrt(n - prefix)
        return t[:, prefix:, :].reshape(b, g, g, d).permute(0, 3, 1, 2)

    reshape.grid = grid
    reshape.prefix_tokens = prefix
    return reshape


# ----------------------------------------------------------------------------- Swin reshape

# Modules that keep (B, C, H, W) inside a Swin: the patch embedding's convolution and its kind.
_CHANNELS_FIRST = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def _swin_widths(model: nn.Module) -> set[int]:
    """The channel widths of the Swin blocks (their norm1's normalised size)."""
    shapes = [getattr(block.norm1, "normalized_shape", None) for _, block in _swin_blocks(model)]
    return {int(s[-1]) for s in shapes if s}


def _is_channels_last(model: nn.Module, layer: nn.Module, out: torch.Tensor) -> bool:
    """Whether a Swin layer's 4-D output is (B, H, W, C). Most are (timm and torchvision blocks, stages, merges and
    final norms), but the patch embedding's convolution is not, nor are the stage outputs of timm's swinv2_cr:
    the dimension holding a block width decides, and the module's kind where both or neither do."""
    widths = _swin_widths(model)
    last, first = int(out.shape[-1]) in widths, int(out.shape[1]) in widths
    if last != first:
        return last
    return not isinstance(layer, _CHANNELS_FIRST)


def _swin_grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) of `tokens` patch tokens: the probed grid when the count fits it, else the probed aspect ratio
    scaled to the count (another input size), else a ConfigError."""
    if tokens == height * width:
        return height, width
    h = max(1, round(height * math.sqrt(tokens / (height * width))))
    if tokens % h:
        raise ConfigError(f"Cannot lay {tokens} Swin tokens out on a grid of the probed aspect {height}x{width}.")
    return h, tokens // h


def swin_reshape_transform(model: nn.Module, input_shape: Sequence[int] = (3, 32, 32),
                           layer: Optional[nn.Module] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """reshape_transform for a Swin layer (timm or torchvision): -> (B, C, H, W).

    Swin maps are channels-last: blocks and stages emit (B, H, W, C); timm's norm2 and MLP see the flattened
    (B, H*W, C) tokens, whose grid (H, W) is the enclosing block's input grid on a probe pass (no class token, not
    necessarily square). Default layer: the automatic one (the last block's norm2)."""
    if layer is None:
        norms = _swin_norm_layers(model)
        if not norms:
            raise ConfigError("swin_reshape_transform needs a Swin (timm or torchvision) or an explicit layer.")
        layer = norms[-1][1]
    names = {id(m): n for n, m in model.named_modules()}
    layer_name = names.get(id(layer), "")
    enclosing = [b for n, b in _swin_blocks(model) if layer_name == n or layer_name.startswith(n + ".")]
    calls, _ = probe(model, probe_input(input_shape), only=[layer] + enclosing[-1:])
    out = next((c.output for c in reversed(calls) if c.module is layer), None)
    if isinstance(out, torch.Tensor) and out.dim() == 4 and not _is_channels_last(model, layer, out):
        raise ConfigError(f"Layer {layer_name!r} of this Swin outputs a channels-first (B, C, H, W) map: it needs "
                          "no reshape.")
    if isinstance(out, torch.Tensor) and out.dim() == 4:
        def channels_last(t: torch.Tensor) -> torch.Tensor:
            return t.permute(0, 3, 1, 2)

        channels_last.grid = tuple(int(s) for s in out.shape[1:3])
        return channels_last
    block_in = next((c.inputs[0] for c in calls if c.module is not layer and c.inputs), None)
    if not (isinstance(out, torch.Tensor) and out.dim() == 3 and isinstance(block_in, torch.Tensor)
            and block_in.dim() == 4 and block_in.shape[1] * block_in.shape[2] == out.shape[1]):
        raise ConfigError(f"Layer {layer_name!r} outputs neither a channels-last (B, H, W, C) Swin map nor the "
                          f"(B, H*W, C) tokens of a Swin block; got {tuple(getattr(out, 'shape', ()))}.")
    height, width = int(block_in.shape[1]), int(block_in.shape[2])

    def tokens_to_map(t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        h, w = _swin_grid(n, height, width)
        return t.reshape(b, h, w, c).permute(0, 3, 1, 2)

    tokens_to_map.grid = (height, width)
    return tokens_to_map


def reshape_transform_for(model: nn.Module, layer: nn.Module,
                          input_shape: Sequence[int] = (3, 32, 32)) -> Optional[Callable]:
    """None when `layer` outputs a 4-D CNN map, the Swin reshape for a Swin's channels-last maps and tokens, the
    ViT token reshape when it outputs (B, T, D)."""
    calls, _ = probe(model, probe_input(input_shape), only=[layer])
    if not calls:
        raise ConfigError("The target layer is not used in the model's forward pass; pick another layer.")
    out = calls[-1].output
    # A Swin's 4-D maps are mostly (B, H, W, C): _is_channels_last tells them from CNN maps.
    if _swin_blocks(model) and isinstance(out, torch.Tensor) and out.dim() in (3, 4) and not (
            out.dim() == 4 and not _is_channels_last(model, layer, out)):
        return swin_reshape_transform(model, input_shape, layer)
    if isinstance(out, torch.Tensor) and out.dim() == 4:
        return None
    return vit_reshape_transform(model, input_shape, layer)


# ----------------------------------------------------------------------------- weight dtype

LOW_PRECISION = (torch.float16, torch.bfloat16)


def weight_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (or buffer); float32 for a model with neither."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _runs(model: nn.Module, x: torch.Tensor) -> Optional[Exception]:
    try:
        with eval_mode(model), torch.no_grad():
            model(x.to(model_device(model)))
    except Exception as exc:  # the caller explains the failure
        return exc
    return None


def float32_model(model: nn.Module, probes: Sequence[torch.Tensor]) -> tuple[nn.Module, Optional[str]]:
    """A model that takes the suite's float32 images, and a note saying what was done, for weights that are not
    float32 (float16, bfloat16, float64):

    - its forward converts the images itself (e.g. `x = x.to(torch.bfloat16)`): the model as it is (the CAM
      engine reads its activations and gradients in float32);
    - otherwise a float32 copy (`copy.deepcopy(model).float()`), when that runs on the probes: the analysis runs
      the weights in float32 (exact: every float16/bfloat16 value is a float32 value);
    - neither: the model as it is, note None (the caller's probe then explains the failure with the dtype).
    float32 models are returned as they are without a forward pass. `probes`: float32 inputs to try, any of which
    may fit (sizes the model may expect)."""
    dtype = weight_dtype(model)
    if dtype == torch.float32:
        return model, None
    name = str(dtype).replace("torch.", "")
    if any(_runs(model, x) is None for x in probes):
        return model, (f"weights in {name}; the model's forward converts its input itself, so inference runs in "
                       f"{name} and the CAMs read its activations and gradients as float32")
    import copy
    copied = copy.deepcopy(model).float()
    if any(_runs(copied, x) is None for x in probes):
        return copied, (f"weights stored as {name}, run in float32: a {name} model cannot take the float32 images "
                        "(its forward does not convert them), and float32 holds every weight exactly")
    return model, None


def dtype_hint(model: nn.Module, exc: BaseException) -> Optional[str]:
    """What to say when a forward pass on float32 images failed because of dtypes (None when it did not look so):
    weights that are not float32 (float32_model found nothing that runs), or float32 weights meeting float16 or
    bfloat16 tensors inside the forward."""
    dtype = weight_dtype(model)
    text = str(exc)
    name = str(dtype).replace("torch.", "")
    cause = f"{type(exc).__name__}: {text[:200]}"
    if dtype != torch.float32:
        return (f"The model's weights are {name} and its forward fails on the float32 images, also as a float32 "
                f"copy ({cause}). Convert the model to float32 before saving it (torch.save(model.float()"
                ".state_dict(), path)), or make its forward convert its input to the weights' dtype.")
    if any(k in text for k in ("Half", "BFloat16", "float16", "bfloat16")):
        return (f"The model's forward mixes dtypes: its weights are float32 but it meets float16/bfloat16 tensors "
                f"({cause}). Remove the conversion from forward, or convert the weights to that dtype too "
                "(model.half() / model.to(torch.bfloat16)) before saving them.")
    return None
