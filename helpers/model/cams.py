"""Class activation maps (Grad-CAM family) on top of pytorch-grad-cam.

Everything here returns CAMs as float32 arrays (N, H, W) in [0, 1], min-max normalised per image
exactly as pytorch-grad-cam does it. Batches always get exactly one target per image: a shorter
target list would make pytorch-grad-cam silently produce all-zero CAMs for the remaining images.

For plain Grad-CAM on a model whose head is global-average-pool -> one Linear layer (ResNets),
the gradients are known in closed form (dlogit_c/dA_k = W[c,k]/(h*w) at every position), so
`CamEngine` computes the CAM from one forward pass without backward. That fast path is checked
against pytorch-grad-cam on the first batch and abandoned if the two disagree.
"""
from __future__ import annotations

import contextlib
import math
import re
import types
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import torch
from torch import nn
from pytorch_grad_cam import (EigenCAM, FinerCAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM,
                              XGradCAM)
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
from pytorch_grad_cam.metrics.road import ROADMostRelevantFirst
from pytorch_grad_cam.utils.image import scale_cam_image, show_cam_on_image
from pytorch_grad_cam.utils.model_targets import (ClassifierOutputSoftmaxTarget, ClassifierOutputTarget,
                                                  FinerWeightedTarget)

from helpers.errors import ConfigError, NumericalError

CAM_METHODS: dict[str, type] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "layercam": LayerCAM,
    "xgradcam": XGradCAM,
    "eigencam": EigenCAM,
    "scorecam": ScoreCAM,
    "finercam": FinerCAM,
}
"""CAM method name -> pytorch-grad-cam class.

"eigencam" is class-agnostic: it is the first principal component of the layer's activations, so
the map is the same whatever target class is asked for. "finercam" explains the target class
against the classes whose logits are closest to it (FinerCAM's default comparison), with Grad-CAM
as the base method. "scorecam" needs one forward pass per channel of the target layer (slow)."""

CLASS_AGNOSTIC_METHODS = {"eigencam"}

# Methods whose pytorch-grad-cam class can serve as FinerCAM's base (they take gradients of the target).
_GRADIENT_METHODS = {"gradcam", "gradcam++", "layercam", "xgradcam"}

FAST_PATH_TOLERANCE = 1e-4
_FAST_PATH = "fast exact Grad-CAM (GAP→Linear head, verified against pytorch-grad-cam)"
_FAST_PENDING = "fast exact Grad-CAM (GAP→Linear head; checked against pytorch-grad-cam on the first batch)"


def check_method(method: str) -> str:
    """The method name, lower-cased; ConfigError listing the valid names if it is unknown."""
    key = str(method).strip().lower()
    if key not in CAM_METHODS:
        raise ConfigError(f"Unknown CAM method {method!r}. Choose one of: {', '.join(CAM_METHODS)}.")
    return key


# ----------------------------------------------------------------------------- model probing

@dataclass
class _Call:
    name: str
    module: nn.Module
    order: int          # completion order of this call in the forward pass
    output: object      # what the module returned (kept alive so `is` comparisons stay valid)
    inputs: tuple


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
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


def _probe(model: nn.Module, x: torch.Tensor, only: Optional[Sequence[nn.Module]] = None):
    """Run `model(x)` with forward hooks on every non-root module (or just `only`).
    Returns (calls in completion order, model output). TorchScript modules and their insides are
    skipped: torch refuses hooks on them (check_hookable explains what to do)."""
    names = {id(m): n for n, m in model.named_modules()}
    scripted = _scripted_names(model)
    watched = ([m for n, m in model.named_modules() if n and not _inside_script(n, scripted)]
               if only is None else list(only))
    calls: list[_Call] = []

    def hook(module, inputs, output):
        calls.append(_Call(names.get(id(module), "?"), module, len(calls), output, inputs))

    handles = [m.register_forward_hook(hook) for m in watched]
    try:
        with _eval_mode(model), torch.no_grad():
            out = model(x.to(_model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return calls, out


def _zeros(input_shape: Sequence[int], batch: int = 1) -> torch.Tensor:
    _check_input_shape(input_shape)
    return torch.zeros((batch,) + tuple(int(s) for s in input_shape))


def _check_input_shape(input_shape) -> None:
    if len(tuple(input_shape)) != 3:
        raise ConfigError(f"input_shape must be (C, H, W); got {tuple(input_shape)}.")


def _is_spatial_map(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[2] * t.shape[3] > 1


def _is_feature_map(call: "_Call") -> bool:
    """A 4-D map larger than 1x1 that the module computed; adaptive pools that keep or enlarge the map
    (torchvision VGG's AdaptiveAvgPool2d(7) after a 1x1 or 7x7 map) only copy values and are skipped."""
    if not _is_spatial_map(call.output):
        return False
    if isinstance(call.module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and call.inputs:
        src = call.inputs[0]
        if isinstance(src, torch.Tensor) and src.dim() == 4 and call.output.shape[2:] >= src.shape[2:]:
            return False
    return True


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


def _spatial_candidates(model: nn.Module, input_shape, max_depth: int) -> list[str]:
    """Modules producing 4-D feature maps, in execution order, at most `max_depth` dots deep
    (deeper sub-layers are valid too, but listing every conv and BatchNorm buries the useful names)."""
    calls, _ = _probe(model, _zeros(input_shape))
    seen, names = set(), []
    for c in calls:
        if _is_feature_map(c) and c.name not in seen and c.name.count(".") <= max_depth:
            seen.add(c.name)
            names.append(c.name)
    return names


def find_target_layer(model: nn.Module, input_shape: Sequence[int] = (3, 32, 32)) -> tuple[str, nn.Module]:
    """The natural Grad-CAM layer, as (dotted name in `model.named_modules()`, module).

    ViTs (timm or torchvision): the first LayerNorm of the last transformer block.
    CNNs: the module whose output is the last 4-D map with more than one spatial position
    produced in a probe forward pass (i.e. the last map before global pooling). Several modules
    can return that same tensor (a stage, its last block, the block's final ReLU); the block
    is reported: the outermost non-Sequential module whose parent is a Sequential/ModuleList stage,
    e.g. `layer3.8` for a CIFAR ResNet-56, `layer4.1` for a ResNet-18, `features.N` for VGG."""
    check_hookable(model)
    vit = _vit_norm_layers(model)
    if vit:
        return vit[-1]
    calls, _ = _probe(model, _zeros(input_shape))
    maps = [c for c in calls if _is_feature_map(c)]
    if not maps:
        scripted = _scripted_names(model)
        why = (f" The TorchScript parts ({', '.join(scripted[:3])}) cannot be hooked: build them as eager "
               "Python modules." if scripted else "")
        raise ConfigError(f"No layer of the model outputs a 4-D feature map larger than 1x1 for input shape "
                          f"{tuple(input_shape)}; set TARGET_LAYER to a layer name explicitly.{why}")
    last = maps[-1].output
    same = {c.name: c for c in calls if c.output is last}.values()

    def depth(c: _Call) -> int:
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
        if p in m._modules and m._modules[p] is not None:
            m = m._modules[p]
        elif re.fullmatch(r"-?\d+", p) and isinstance(m, _STAGES) and -len(m) <= int(p) < len(m):
            m = m[int(p)]   # positional, so "layer4.-1" works too
        else:
            return None
    return m


def _candidates_text(model: nn.Module, input_shape) -> str:
    vit = [n for n, _ in _vit_norm_layers(model)]
    if vit:
        return f"Candidate layers (ViT block norms; the default is the last): {', '.join(vit)}."
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
    calls, _ = _probe(model, _zeros(input_shape), only=[module])
    if not calls:
        raise ConfigError(f"Target layer {name!r} is not used in the model's forward pass; pick another layer.")
    out = calls[-1].output
    if not (isinstance(out, torch.Tensor) and out.dim() in (3, 4)):
        raise ConfigError(f"Target layer {name!r} does not output a 4-D feature map or 3-D token tensor "
                          f"(got {type(out).__name__} {tuple(getattr(out, 'shape', ()))}); pick another layer.")
    return name, module


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
    calls, _ = _probe(model, _zeros(input_shape), only=[layer])
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


def reshape_transform_for(model: nn.Module, layer: nn.Module,
                          input_shape: Sequence[int] = (3, 32, 32)) -> Optional[Callable]:
    """None when `layer` outputs a 4-D CNN map, the ViT token reshape when it outputs (B, T, D)."""
    calls, _ = _probe(model, _zeros(input_shape), only=[layer])
    if not calls:
        raise ConfigError("The target layer is not used in the model's forward pass; pick another layer.")
    out = calls[-1].output
    if isinstance(out, torch.Tensor) and out.dim() == 4:
        return None
    return vit_reshape_transform(model, input_shape, layer)


# ----------------------------------------------------------------------------- fast exact Grad-CAM

def gradcam_from_activations(activations, weights, targets, out_size: tuple[int, int]) -> np.ndarray:
    """Grad-CAM for a GAP -> Linear head: ReLU(sum_k W[c,k]/(h*w) * A_k), resized to out_size=(H, W) and
    min-max normalised with pytorch-grad-cam's own scale_cam_image, exactly as GradCAM does.

    The 1/(h*w) (the GAP gradient) would vanish under min-max but for the library's 1e-7 guard, so it is
    kept to match to float precision. activations (N,K,h,w), weights (C,K), targets (N,) -> (N,H,W)."""
    a = torch.as_tensor(activations, dtype=torch.float32)
    w = torch.as_tensor(weights, dtype=torch.float32, device=a.device)
    t = torch.as_tensor(np.asarray(targets, dtype=np.int64), device=a.device)
    if a.dim() != 4 or w.dim() != 2 or w.shape[1] != a.shape[1] or t.shape != (a.shape[0],):
        raise ConfigError(f"gradcam_from_activations: shapes do not fit: activations {tuple(a.shape)}, "
                          f"weights {tuple(w.shape)}, targets {tuple(t.shape)}.")
    h, wd = a.shape[2], a.shape[3]
    cam = torch.einsum("nk,nkhw->nhw", w[t] / (h * wd), a).clamp_min(0)
    return _scale_like_library(cam.cpu().numpy(), out_size)


def gradcam_from_logit_gradients(activations, weights, logit_grads, out_size: tuple[int, int]) -> np.ndarray:
    """Grad-CAM, for a GAP -> Linear head, of any target computed from the logits z alone (FinerCAM's weighted
    logit differences, say): the gradient reaching activation channel k is sum_c dT/dz_c * W[c,k]/(h*w) at
    every position, so the CAM is ReLU(sum_k (g @ W)_k/(h*w) * A_k), scaled as GradCAM scales it.
    activations (N,K,h,w), weights (C,K), logit_grads g (N,C) -> (N,H,W)."""
    a = torch.as_tensor(activations, dtype=torch.float32)
    w = torch.as_tensor(weights, dtype=torch.float32, device=a.device)
    g = torch.as_tensor(logit_grads, dtype=torch.float32, device=a.device)
    if a.dim() != 4 or w.dim() != 2 or w.shape[1] != a.shape[1] or g.shape != (a.shape[0], w.shape[0]):
        raise ConfigError(f"gradcam_from_logit_gradients: shapes do not fit: activations {tuple(a.shape)}, "
                          f"weights {tuple(w.shape)}, logit gradients {tuple(g.shape)}.")
    h, wd = a.shape[2], a.shape[3]
    cam = torch.einsum("nk,nkhw->nhw", g @ w / (h * wd), a).clamp_min(0)
    return _scale_like_library(cam.cpu().numpy(), out_size)


def _scale_like_library(cam: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """BaseCAM: per-layer min-max + cv2 resize, clip at 0, average over (one) layer, min-max again."""
    height, width = out_size
    scaled = np.maximum(scale_cam_image(cam, (int(width), int(height))), 0)
    return scale_cam_image(scaled)


def _gap_linear_head(model: nn.Module, layer: nn.Module, input_shape) -> tuple[Optional[nn.Linear], str]:
    """(Linear, "") when what runs after `layer` is global average pooling, optional
    Flatten/Dropout/Identity and exactly one nn.Linear producing the model output; else (None, why).
    Module types are checked on the executed modules, and the semantics numerically on a random probe
    (functional ops between modules are invisible to hooks, hence the numeric check)."""
    leaves = [m for m in model.modules() if not list(m.children()) and m is not layer
              and not isinstance(m, torch.jit.ScriptModule)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2,) + tuple(int(s) for s in input_shape), generator=gen)
    calls, out = _probe(model, x, only=[layer] + leaves)
    mine = [c for c in calls if c.module is layer]
    if not mine:
        return None, "target layer not used in forward"
    act = mine[-1].output
    if not (isinstance(act, torch.Tensor) and act.dim() == 4):
        return None, "target layer output is not a 4-D map"
    after = [c for c in calls if c.order > mine[-1].order]
    allowed = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Linear)
    odd = sorted({type(c.module).__name__ for c in after if not isinstance(c.module, allowed)})
    if odd:
        return None, f"head runs {', '.join(odd)}"
    linears = [c for c in after if isinstance(c.module, nn.Linear)]
    if len(linears) != 1 or after[-1] is not linears[0]:
        return None, f"head has {len(linears)} Linear layers, not one final Linear"
    lin = linears[0]
    pooled = act.float().mean(dim=(2, 3))
    lin_in = lin.inputs[0] if lin.inputs else None
    if not (isinstance(lin_in, torch.Tensor) and lin_in.shape == pooled.shape
            and torch.allclose(lin_in.float(), pooled, rtol=1e-4, atol=1e-5)):
        return None, "Linear input is not the spatial mean of the target layer"
    if not (isinstance(out, torch.Tensor) and out.shape == lin.output.shape
            and torch.allclose(out.float(), lin.output.float(), rtol=1e-5, atol=1e-6)):
        return None, "model output is not the Linear output"
    return lin.module, ""


# ----------------------------------------------------------------------------- engine

def _as_targets(targets, n: int, num_classes: int, what: str = "targets") -> np.ndarray:
    arr = np.asarray(targets)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ConfigError(f"{what} must hold exactly one class per image: got shape {arr.shape} for {n} images.")
    if n and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ConfigError(f"{what} must be integer class ids.")
    arr = arr.astype(np.int64)
    if n and (arr.min() < 0 or arr.max() >= num_classes):
        raise ConfigError(f"{what} must be class ids in [0, {num_classes - 1}]; got {arr.min()}..{arr.max()}.")
    return arr


def _nearest_classes(logits: np.ndarray, target: int, k: int = 3) -> list[int]:
    """FinerCAM's default comparison set: the k classes whose logits are closest to the target's."""
    order = np.argsort(np.abs(logits - logits[target]), kind="stable")
    return [int(c) for c in order if c != target][:k]


@contextlib.contextmanager
def _quiet_scorecam():
    """ScoreCAM draws one tqdm bar per image; CamEngine shows its own progress per batch instead."""
    import pytorch_grad_cam.score_cam as score_cam
    original = score_cam.tqdm
    score_cam.tqdm = types.SimpleNamespace(tqdm=lambda iterable, *args, **kwargs: iterable)
    try:
        yield
    finally:
        score_cam.tqdm = original


class CamEngine:
    """Computes CAMs for one model, method and target layer, in batches.

    Attributes: `method`, `layer_name`, `layer`, `reshape_transform` (None for CNNs), `num_classes`,
    `path` (which computation ran: the fast exact Grad-CAM or pytorch-grad-cam, batched),
    `fast_max_diff` (fast vs library on the verification batch, when checked)."""

    def __init__(self, model: nn.Module, method: str = "gradcam", target_layer: Optional[str] = None,
                 input_shape: Sequence[int] = (3, 32, 32), batch_size: int = 64, device="cpu",
                 fast_path: bool = True):
        self.method = check_method(method)
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1; got {batch_size}.")
        _check_input_shape(input_shape)
        self.batch_size = int(batch_size)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()   # the CAM classes put it in eval mode anyway
        self.layer_name, self.layer = resolve_target_layer(self.model, target_layer, self.input_shape)
        self.reshape_transform = reshape_transform_for(self.model, self.layer, self.input_shape)
        _, out = _probe(self.model, _zeros(self.input_shape), only=[])
        if not (isinstance(out, torch.Tensor) and out.dim() == 2):
            raise ConfigError(f"The model must return logits (batch, classes); got {type(out).__name__} "
                              f"{tuple(getattr(out, 'shape', ()))}.")
        self.num_classes = int(out.shape[1])
        self.fast_max_diff: Optional[float] = None
        self._linear: Optional[nn.Linear] = None
        self._verified = False
        self._finer_verified = self._finer_fast = False   # the same shortcut for FinerCAM (Grad-CAM base)
        self.finer_fast_max_diff: Optional[float] = None
        reason = "fast_path=False"
        if self.method != "gradcam":
            reason = ""
        elif fast_path and self.reshape_transform is not None:
            reason = "fast path needs a CNN feature map"
        elif fast_path:
            self._linear, reason = _gap_linear_head(self.model, self.layer, self.input_shape)
        if self._linear is None:
            self._set_library_path(reason)
        else:
            self.path = _FAST_PENDING

    def _set_library_path(self, reason: str) -> None:
        self._linear = None
        cls = CAM_METHODS[self.method].__name__
        self.path = f"pytorch-grad-cam {cls}, batched" + (f" (fast path not used: {reason})" if reason else "")

    # -- public
    def compute(self, inputs: torch.Tensor, targets, progress: bool = True) -> np.ndarray:
        """CAMs (N, H, W) float32 in [0, 1] for normalised inputs (N, C, H, W), explaining class
        targets[i] for image i (ignored by class-agnostic methods such as eigencam)."""
        x = self._as_inputs(inputs)
        t = _as_targets(targets, x.shape[0], self.num_classes)
        if self._linear is not None and not self._verified and len(x):
            self._verify_fast(x[:4], t[:4])
        return self._batched(x, lambda xb, tb: self._one_batch(xb, tb), t, progress)

    @property
    def fast(self) -> bool:
        """True while the fast exact Grad-CAM path is in use (not yet refuted by the verification)."""
        return self._linear is not None

    def compute_from_activations(self, inputs: torch.Tensor, activations: torch.Tensor, targets) -> Optional[np.ndarray]:
        """Fast-path CAMs (N, H, W) from this engine's target-layer activations (N, K, h, w) captured
        earlier, e.g. by a hook during the inference pass, so no forward pass is needed. `inputs` are the
        same images, used only for the one-time check against pytorch-grad-cam. None when the fast path
        does not apply or the check fails: call compute() then."""
        if self._linear is None:
            return None
        x = self._as_inputs(inputs)
        t = _as_targets(targets, x.shape[0], self.num_classes)
        if not self._verified and len(x):
            self._verify_fast(x[:4], t[:4])
            if self._linear is None:
                return None
        out = np.zeros((len(x),) + tuple(x.shape[-2:]), np.float32)
        with torch.inference_mode():   # captured activations may be inference tensors
            weight = self._linear.weight.float()
            for s in range(0, len(x), 256):
                out[s:s + 256] = gradcam_from_activations(activations[s:s + 256].to(self.device).float(), weight,
                                                          t[s:s + 256], tuple(x.shape[-2:]))
        if not np.all(np.isfinite(out)):
            raise NumericalError(f"{self.method} produced NaN/inf CAMs at layer {self.layer_name}; "
                                 "check the model's outputs for NaN/inf.")
        return out

    def compute_finer(self, inputs: torch.Tensor, true_classes, pred_classes, progress: bool = True) -> np.ndarray:
        """FinerCAM (N, H, W): what makes image i look like true_classes[i] rather than pred_classes[i]
        (target = logit_true - logit_pred, FinerWeightedTarget(true, [pred], alpha=1)). Where true equals
        pred that difference is identically zero, so the true class is compared with its nearest classes
        by logit instead (FinerCAM's default). Base method: this engine's method if gradient-based
        (gradcam, gradcam++, layercam, xgradcam), otherwise Grad-CAM."""
        x = self._as_inputs(inputs)
        t = _as_targets(true_classes, x.shape[0], self.num_classes, "true_classes")
        p = _as_targets(pred_classes, x.shape[0], self.num_classes, "pred_classes")
        pairs = np.stack([t, p], axis=1)
        if self._linear is not None and not self._finer_verified and len(x):
            self._verify_finer_fast(x[:4], t[:4], p[:4])
        batch = self._finer_fast_batch if self._finer_fast else self._finer_batch
        return self._batched(x, lambda xb, pb: batch(xb, pb[:, 0], pb[:, 1]), pairs, progress)

    # -- internals
    def _as_inputs(self, inputs) -> torch.Tensor:
        x = torch.as_tensor(inputs)
        if x.dim() != 4 or x.shape[1] != self.input_shape[0]:
            raise ConfigError(f"inputs must be normalised images (N, {self.input_shape[0]}, H, W); "
                              f"got {tuple(x.shape)}.")
        return x.float()

    def _batched(self, x: torch.Tensor, fn, per_image: np.ndarray, progress: bool) -> np.ndarray:
        n, (h, w) = x.shape[0], x.shape[-2:]
        out = np.zeros((n, h, w), np.float32)
        starts = range(0, n, self.batch_size)
        if progress and n > 4 * self.batch_size:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc=f"{self.method} CAMs", unit="batch")
        for s in starts:
            out[s:s + self.batch_size] = fn(x[s:s + self.batch_size].to(self.device),
                                            per_image[s:s + self.batch_size])
        if not np.all(np.isfinite(out)):
            raise NumericalError(f"{self.method} produced NaN/inf CAMs at layer {self.layer_name}; "
                                 "check the model's outputs for NaN/inf.")
        return out

    def _one_batch(self, xb: torch.Tensor, tb: np.ndarray) -> np.ndarray:
        if self._linear is not None:
            return self._fast_batch(xb, tb)
        if self.method == "finercam":
            logits = self._logits(xb)
            targets = [FinerWeightedTarget(int(c), _nearest_classes(logits[i], int(c)), 1.0)
                       for i, c in enumerate(tb)]
        else:
            targets = [ClassifierOutputTarget(int(c)) for c in tb]
        return self._library(CAM_METHODS[self.method], xb, targets)

    @staticmethod
    def _finer_targets(tb: np.ndarray, pb: np.ndarray, logits: Optional[np.ndarray]) -> list:
        return [FinerWeightedTarget(int(t), [int(p)] if t != p else _nearest_classes(logits[i], int(t)), 1.0)
                for i, (t, p) in enumerate(zip(tb, pb))]

    def _finer_batch(self, xb: torch.Tensor, tb: np.ndarray, pb: np.ndarray) -> np.ndarray:
        logits = self._logits(xb) if np.any(tb == pb) else None
        return self._library(FinerCAM, xb, self._finer_targets(tb, pb, logits))

    def _finer_fast_batch(self, xb: torch.Tensor, tb: np.ndarray, pb: np.ndarray) -> np.ndarray:
        """FinerCAM (Grad-CAM base) for a GAP -> Linear head: one forward pass, then the targets' gradients
        with respect to the logits only (gradcam_from_logit_gradients); no backward pass through the model."""
        logits, activations = self._forward_with_activations(xb)
        logits = logits.float()
        z = logits.clone().requires_grad_(True)
        targets = self._finer_targets(tb, pb, logits.cpu().numpy())
        with torch.enable_grad():   # as FinerCAM: the sum over images of each image's target
            (grads,) = torch.autograd.grad(sum(target(zi) for target, zi in zip(targets, z)), z)
        return gradcam_from_logit_gradients(activations.float(), self._linear.weight.detach().float(), grads,
                                            tuple(xb.shape[-2:]))

    def _verify_finer_fast(self, xb: torch.Tensor, tb: np.ndarray, pb: np.ndarray) -> None:
        """Compare the fast FinerCAM with pytorch-grad-cam's FinerCAM on a few real images, for the requested
        pairs and for true = pred (nearest-class comparison); use the library from then on if they differ."""
        xb = xb.to(self.device)
        diff = max(float(np.abs(self._finer_fast_batch(xb, tb, q) - self._finer_batch(xb, tb, q)).max())
                   for q in (pb, tb))
        self.finer_fast_max_diff = diff
        self._finer_fast = diff <= FAST_PATH_TOLERANCE   # written so that NaN also falls back
        self._finer_verified = True

    def _logits(self, xb: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.model(xb).float().cpu().numpy()

    def _library(self, cls: type, xb: torch.Tensor, targets: list) -> np.ndarray:
        """One pytorch-grad-cam call with exactly one target per image; hooks removed afterwards
        (left registered they would record every later forward pass of the model)."""
        if cls is FinerCAM:
            base = CAM_METHODS[self.method] if self.method in _GRADIENT_METHODS else GradCAM
            cam = FinerCAM(self.model, [self.layer], reshape_transform=self.reshape_transform, base_method=base)
            hooks = cam.base_cam.activations_and_grads
        else:
            cam = cls(self.model, [self.layer], reshape_transform=self.reshape_transform)
            hooks = cam.activations_and_grads
            if isinstance(cam, ScoreCAM):
                cam.batch_size = self.batch_size
        if not any(p.requires_grad for p in self.model.parameters()):
            xb = xb.detach().clone().requires_grad_(True)   # frozen weights: gradients must still reach the layer
        try:
            with torch.enable_grad(), _quiet_scorecam():
                result = cam(input_tensor=xb, targets=targets)
        finally:
            hooks.release()
            self.model.zero_grad(set_to_none=True)
        return np.asarray(result, dtype=np.float32)

    def _forward_with_activations(self, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, target-layer activations) of one forward pass without autograd (the fast paths' only pass)."""
        store = {}
        handle = self.layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
        try:
            with torch.no_grad():
                logits = self.model(xb)
        finally:
            handle.remove()
        return logits, store["a"]

    def _fast_batch(self, xb: torch.Tensor, tb: np.ndarray) -> np.ndarray:
        _, activations = self._forward_with_activations(xb)
        return gradcam_from_activations(activations.float(), self._linear.weight.detach().float(), tb,
                                        tuple(xb.shape[-2:]))

    def _verify_fast(self, xb: torch.Tensor, tb: np.ndarray) -> None:
        """Compare the fast path with pytorch-grad-cam GradCAM on a few real images, for the requested
        classes and for other classes; fall back to the library if they differ."""
        xb = xb.to(self.device)
        diff = 0.0
        for classes in (tb, (tb + 1) % self.num_classes):
            ref = self._library(GradCAM, xb, [ClassifierOutputTarget(int(c)) for c in classes])
            diff = max(diff, float(np.abs(self._fast_batch(xb, classes) - ref).max()))
        self.fast_max_diff = diff
        if not diff <= FAST_PATH_TOLERANCE:   # written so that NaN also falls back
            self._set_library_path(f"fast CAM differed from pytorch-grad-cam by {diff:.2g}")
        else:
            self.path = _FAST_PATH
        self._verified = True


# ----------------------------------------------------------------------------- display

def _as_rgb01(images: np.ndarray) -> np.ndarray:
    """A stack of images (N, H, W[, 1 or 3]) as float32 RGB in [0, 1], the input show_cam_on_image wants:
    uint8 is divided by 255, and so is any other image whose values exceed 1."""
    img = images[..., None] if images.ndim == 3 else images
    if img.ndim != 4 or img.shape[3] not in (1, 3):
        raise ConfigError(f"overlay expects an image (H, W, C) with C in (1, 3); got {img.shape[1:]}.")
    if img.shape[3] == 1:
        img = np.repeat(img, 3, axis=3)
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    scale = np.where(img.reshape(len(img), -1).max(axis=1) > 1, 255.0, 1.0).astype(np.float32)
    return img.astype(np.float32) / scale[:, None, None, None]


def _cam_mask(cam: np.ndarray, h: int, w: int) -> np.ndarray:
    """A CAM as show_cam_on_image's mask: float32 in [0, 1] (NaN → 0), resized to (h, w) when it differs."""
    mask = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float32)), 0, 1)
    return mask if mask.shape == (h, w) else cv2.resize(mask, (w, h))


def _check_image_weight(image_weight: float) -> None:
    if not 0 <= image_weight <= 1:
        raise ConfigError(f"image_weight must be in [0, 1]; got {image_weight}.")


def overlay(image: np.ndarray, cam: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """uint8 RGB (H, W, 3): the CAM as a JET heat map (red = high) blended over the image with
    pytorch-grad-cam's show_cam_on_image(use_rgb=True). image: uint8 (H, W), (H, W, 1) or (H, W, 3)."""
    rgb = _as_rgb01(np.asarray(image)[None])[0]
    _check_image_weight(image_weight)
    return show_cam_on_image(rgb, _cam_mask(cam, *rgb.shape[:2]), use_rgb=True, image_weight=float(image_weight))


def overlay_many(images: Sequence[np.ndarray], cams: Sequence[np.ndarray], image_weight: float = 0.5) -> np.ndarray:
    """`overlay` of every (image, CAM) pair, in one vectorised pass: uint8 (N, H, W, 3).

    The same operations as show_cam_on_image, per pixel and in float32, so each result is bit-identical to
    `overlay(images[i], cams[i])`. A gallery page needs ~13 overlays of 32x32 images and the library call
    costs ~0.5 ms each in per-call overhead: 100 class pages spent 0.7 s there. Images must share one shape."""
    if len(images) != len(cams):
        raise ConfigError(f"overlay_many needs one CAM per image; got {len(images)} images and {len(cams)} CAMs.")
    if not len(images):
        return np.zeros((0, 0, 0, 3), np.uint8)
    _check_image_weight(image_weight)
    rgb = _as_rgb01(np.stack([np.asarray(i) for i in images]))
    n, h, w = rgb.shape[:3]
    mask = np.stack([_cam_mask(c, h, w) for c in cams])
    # show_cam_on_image, on all maps at once: OpenCV colours a 2-D array, so stack the maps vertically
    heatmap = cv2.applyColorMap(np.uint8(255 * mask).reshape(n * h, w), cv2.COLORMAP_JET)
    heatmap = np.float32(cv2.cvtColor(heatmap, cv2.COLOR_BGR2RGB).reshape(n, h, w, 3)) / 255
    out = (1 - float(image_weight)) * heatmap + float(image_weight) * rgb
    out = out / out.max(axis=(1, 2, 3), keepdims=True)
    return np.uint8(255 * out)


def cam_colormap_rgb(values) -> np.ndarray:
    """RGB colours (float32 in [0, 1], shape values.shape + (3,)) that `overlay` gives CAM values in [0, 1]
    (OpenCV's COLORMAP_JET, which differs slightly from matplotlib's "jet"). For a matching colour bar:
    matplotlib.colors.ListedColormap(cam_colormap_rgb(np.linspace(0, 1, 256)))."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0, 1)
    bgr = cv2.applyColorMap(np.uint8(255 * v).reshape(-1, 1), cv2.COLORMAP_JET)
    return (bgr[:, 0, ::-1].astype(np.float32) / 255.0).reshape(v.shape + (3,))


# ----------------------------------------------------------------------------- faithfulness

FAITHFULNESS_METRICS = ("road", "confidence_change")


def faithfulness(model: nn.Module, inputs: torch.Tensor, targets, cams: np.ndarray, metric: str = "road",
                 batch_size: int = 64, seed: int = 0, scores_before: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-image faithfulness score (N,) of `cams` for class `targets[i]`, from pytorch-grad-cam's metrics.
    Both are p_after - p_before, the change of the target's softmax probability, in [-1, 1]:

    - "road" (ROADMostRelevantFirst, percentile 80): the 20% of pixels with the highest CAM values are
      replaced by noisy linear interpolation of their neighbours. NEGATIVE = confidence dropped when the
      highlighted pixels were removed, so the CAM points at evidence the model really uses; more negative
      is more faithful; ~0 means the highlighted pixels did not matter. The noise is seeded by `seed`.
    - "confidence_change" (CamMultImageConfidenceChange): the normalised input is multiplied by the CAM
      (un-highlighted pixels go to the dataset mean). ~0 or positive = the highlighted pixels alone keep the
      prediction, so the CAM covers the evidence; strongly negative = evidence lies outside the CAM.

    scores_before: the targets' softmax probabilities on the unperturbed `inputs` when already known (the
    analysis has them from its inference pass); the metric then runs the model on the perturbed images only.
    """
    key = str(metric).strip().lower()
    if key not in FAITHFULNESS_METRICS:
        raise ConfigError(f"Unknown faithfulness metric {metric!r}. Choose one of: {', '.join(FAITHFULNESS_METRICS)}.")
    x = torch.as_tensor(inputs).float()
    n = x.shape[0]
    maps = np.ascontiguousarray(np.asarray(cams, dtype=np.float32))
    if maps.shape != (n,) + tuple(x.shape[-2:]):
        raise ConfigError(f"cams must be (N, H, W) = {(n,) + tuple(x.shape[-2:])}; got {maps.shape}.")
    classes = np.asarray(targets)
    if classes.shape != (n,):
        raise ConfigError(f"targets must hold exactly one class per image: got shape {classes.shape} for {n} images.")
    before = _check_scores_before(scores_before, n)
    scorer = ROADMostRelevantFirst(percentile=80) if key == "road" else CamMultImageConfidenceChange()
    device = _model_device(model)
    out = np.zeros(n, np.float32)
    with _eval_mode(model), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # ROAD's imputer calls numpy functions on torch tensors (library-internal NumPy 2 deprecation).
        warnings.filterwarnings("ignore", message="__array_wrap__ must accept context", category=DeprecationWarning)
        torch.manual_seed(seed)
        for s in range(0, n, int(batch_size)):
            e = min(s + int(batch_size), n)
            tg = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes[s:e]]
            out[s:e] = perturbation_score(scorer, x[s:e].to(device), maps[s:e], tg, model,
                                          None if before is None else before[s:e])
    return out


def _check_scores_before(scores_before, n: int) -> Optional[np.ndarray]:
    if scores_before is None:
        return None
    before = np.asarray(scores_before, dtype=np.float32).reshape(-1)
    if before.shape != (n,) or not np.isfinite(before).all():
        raise ConfigError(f"scores_before must hold one finite score per image ({n}); got shape {before.shape}.")
    return before


def perturbation_score(scorer, x: torch.Tensor, maps: np.ndarray, targets: list, model: nn.Module,
                       before: Optional[np.ndarray] = None) -> np.ndarray:
    """A pytorch-grad-cam perturbation metric's score_after - score_before. With `before` known, the metric is
    asked for the perturbed scores only (return_diff=False), which saves its forward pass on the originals."""
    if before is None:
        return scorer(x, maps, targets, model)
    return scorer(x, maps, targets, model, return_diff=False) - before
