"""Pixel attributions beside the CAMs: Captum's gradient and perturbation methods, and ViT attention maps.

One interface for every method, like pytorch-grad-cam's BaseCAM:
`attribute(model, inputs, targets, method, baseline=...) -> np.ndarray (N, H, W)` float32, one map per image
explaining class targets[i] on normalised inputs (N, C, H, W). Channels are aggregated so that every map reads
"higher = more evidence for the target" (see `ATTRIBUTION_METHODS[m].aggregation`):

- "abs_sum": sum over channels of |attribution| (saliency, SmoothGrad): a gradient's sign flips with the
  channel's normalisation, only its size says how much the pixel matters.
- "sum": signed sum over channels (Input x Gradient, Integrated Gradients, GradientShap, LIME, KernelShap):
  these are additive contributions to the logit, so the channel sum keeps completeness (IG's maps sum to
  f(x) - f(baseline)) and negative = evidence against the class.
- attention maps are attention weights, not attributions: the CLS token's attention over the patches,
  upsampled to the image (bilinear). They do not depend on the target class.

Baselines (IG, GradientShap, LIME, KernelShap): "black" (pixel value 0 after the dataset's normalisation),
"blurred" (the image under a Gaussian blur, sigma = side / 8), "uniform" (seeded uniform noise in pixel space).
LIME and KernelShap perturb superpixels: scikit-image SLIC when installed and the image is larger than 32 px,
else a fixed grid of square cells (SLIC on a 32-px image gives cells of a few pixels that follow noise).
Every map is the library's own output: the tests compare each with a direct Captum call within 1e-5.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from helpers.errors import ConfigError, NumericalError
from helpers.model.layers import saved_bytes_per_image

BASELINES = ("black", "blurred", "uniform")
IG_STEPS = 64                 # completeness: within 1% over 64 Fashion-MNIST test images at 64 steps (median image 0.7-1.2%)
SMOOTHGRAD_SAMPLES = 16
SMOOTHGRAD_STDEV = 0.15       # noise std in normalised-input units (~15% of a channel's spread)
GRADSHAP_SAMPLES = 16
PERTURBATION_SAMPLES = 200    # LIME / KernelShap model evaluations per image
PERTURBATIONS_PER_EVAL = 50
PIXEL_BUDGET = 1 << 22       # input values per forward-only pass of LIME/KernelShap (~27 images at 224 px)
# What autograd may keep for one batch of IG path points or SmoothGrad samples. Sized by the model's saved
# activations, not by its input: 512 ResNet-34-CIFAR path points in one batch (6 GB kept) took 18.6 s where
# batches of 87 (this budget) took 8.6 s, the same maps (within 5e-8); ResNet-56 2.5 -> 1.8 s.
GRADIENT_BATCH_BYTES = 1 << 30
GRID_CELLS = 8                # fixed superpixel grid: about 8 x 8 cells whatever the side
SLIC_SEGMENTS = 100


@dataclass(frozen=True)
class AttributionMethod:
    name: str
    cost: str                 # "fast" (a few backward passes) or "slow" (hundreds of forward passes per image)
    aggregation: str          # "abs_sum", "sum" or "attention"
    uses_baseline: bool
    class_specific: bool
    library: str              # what computes it
    note: str                 # when it misleads


ATTRIBUTION_METHODS: dict[str, AttributionMethod] = {m.name: m for m in (
    AttributionMethod("saliency", "fast", "abs_sum", False, True, "captum.attr.Saliency",
                      "saturation: where the logit is flat in a pixel the gradient is ~0 although the pixel matters"),
    AttributionMethod("inputxgradient", "fast", "sum", False, True, "captum.attr.InputXGradient",
                      "zero wherever the normalised input is 0, and inherits the gradient's saturation"),
    AttributionMethod("smoothgrad", "fast", "abs_sum", False, True, "captum.attr.NoiseTunnel(Saliency, 'smoothgrad')",
                      "the noise level sets how blurry the map is; it averages away detail as well as noise"),
    AttributionMethod("integratedgradients", "fast", "sum", True, True, "captum.attr.IntegratedGradients",
                      "relative to its baseline: pixels that equal the baseline (black on a black background) get 0"),
    AttributionMethod("gradientshap", "fast", "sum", True, True, "captum.attr.GradientShap",
                      "random: a few noisy baselines; maps vary between seeds"),
    AttributionMethod("lime", "slow", "sum", True, True, "captum.attr.Lime (superpixels)",
                      "a local linear surrogate on superpixels: as coarse as the cells, and random"),
    AttributionMethod("kernelshap", "slow", "sum", True, True, "captum.attr.KernelShap (superpixels)",
                      "Shapley values on superpixels from a few hundred samples: coarse and noisy"),
    AttributionMethod("attention", "fast", "attention", False, False, "last block's attention (ViTs only)",
                      "attention is not attribution: where the CLS token looks, not what changes the output"),
    AttributionMethod("rollout", "fast", "attention", False, False, "attention rollout, Abnar & Zuidema 2020",
                      "attention is not attribution; rollout also ignores the MLPs and the value vectors"),
)}
"""Method name -> its cost class, aggregation and caveat. "lime" and "kernelshap" are slow: never in a default
method list; "attention" and "rollout" need a ViT."""

DEFAULT_METHODS = tuple(m for m, spec in ATTRIBUTION_METHODS.items()
                        if spec.cost == "fast" and spec.aggregation != "attention")
VIT_METHODS = ("attention", "rollout")


def check_attribution_method(method: str) -> str:
    key = str(method).strip().lower()
    if key not in ATTRIBUTION_METHODS:
        raise ConfigError(f"Unknown attribution method {method!r}. Choose one of: {', '.join(ATTRIBUTION_METHODS)}.")
    return key


# ----------------------------------------------------------------------------- baselines and superpixels
def make_baseline(inputs: torch.Tensor, kind: str = "black", mean: Optional[Sequence[float]] = None,
                  std: Optional[Sequence[float]] = None, seed: int = 0) -> torch.Tensor:
    """The baseline images (normalised like `inputs`). mean/std: the dataset's normalisation (None = inputs are
    raw pixels in [0, 1])."""
    key = str(kind).strip().lower()
    if key not in BASELINES:
        raise ConfigError(f"Unknown baseline {kind!r}. Choose one of: {', '.join(BASELINES)}.")
    x = torch.as_tensor(inputs).float()
    c = x.shape[1]
    m = torch.as_tensor(mean if mean is not None else [0.0] * c, dtype=x.dtype).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std if std is not None else [1.0] * c, dtype=x.dtype).reshape(1, -1, 1, 1)
    if key == "black":
        return ((0.0 - m) / s).expand_as(x).to(x.device).clone()
    if key == "uniform":   # one seeded noise image for every input: a map does not depend on its batch
        gen = torch.Generator().manual_seed(int(seed))
        noise = torch.rand((1,) + tuple(x.shape[1:]), generator=gen)
        return ((noise - m) / s).expand_as(x).to(x.device).clone()
    from torchvision.transforms.functional import gaussian_blur
    sigma = max(x.shape[-1], x.shape[-2]) / 8.0
    k = 2 * int(math.ceil(3 * sigma)) + 1
    k = min(k, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)   # reflect padding needs a kernel smaller than the image
    return gaussian_blur(x, [k, k], [sigma, sigma])


def superpixels(images: torch.Tensor, grid_cells: int = GRID_CELLS, n_segments: int = SLIC_SEGMENTS) -> torch.Tensor:
    """Feature masks (N, 1, H, W) int64 for LIME/KernelShap: SLIC (scikit-image) on images larger than 32 px when
    it is installed, else a fixed grid of about grid_cells x grid_cells square cells."""
    x = torch.as_tensor(images)
    n, _, h, w = x.shape
    if max(h, w) > 32:
        try:
            from skimage.segmentation import slic
        except ImportError:
            slic = None
        if slic is not None:
            arr = x.detach().float().cpu().numpy().transpose(0, 2, 3, 1)
            # compactness 10 is scaled for Lab values (0..100); these are normalised inputs, so it is scaled to
            # each image's range (with 10 on 0..1 values SLIC drew a plain grid across a black/white edge)
            masks = [slic(a, n_segments=n_segments, compactness=0.1 * max(float(np.ptp(a)), 1e-6), start_label=0,
                          channel_axis=-1, convert2lab=False) for a in arr]
            return torch.as_tensor(np.stack(masks)[:, None], dtype=torch.int64, device=x.device)
    return grid_mask(h, w, grid_cells).to(x.device).expand(n, 1, h, w).clone()


def grid_mask(h: int, w: int, cells: int = GRID_CELLS) -> torch.Tensor:
    """(1, 1, h, w) ids of square cells of side ceil(max(h, w) / cells), row-major."""
    side = max(1, math.ceil(max(h, w) / cells))
    rows, cols = torch.arange(h) // side, torch.arange(w) // side
    return (rows[:, None] * (int(cols.max()) + 1) + cols[None, :])[None, None].to(torch.int64)


# ----------------------------------------------------------------------------- Captum methods
def aggregate(raw: torch.Tensor, how: str) -> np.ndarray:
    """Captum's (N, C, H, W) attributions -> (N, H, W) maps, as the module docstring says."""
    raw = raw.detach().float()
    out = raw.abs().sum(dim=1) if how == "abs_sum" else raw.sum(dim=1)
    return out.cpu().numpy().astype(np.float32)


def gradient_batch_size(model: nn.Module, x: torch.Tensor) -> int:
    """How many inputs shaped like x[0] one backward batch may hold: GRADIENT_BATCH_BYTES of saved activations."""
    return max(1, GRADIENT_BATCH_BYTES // saved_bytes_per_image(model, tuple(x.shape[1:]), x.device))


RANDOM_METHODS = ("smoothgrad", "gradientshap", "lime", "kernelshap")


def _captum_raw(model: nn.Module, x: torch.Tensor, t: torch.Tensor, method: str, base: Optional[torch.Tensor],
                seed: int) -> torch.Tensor:
    """Captum's raw (N, C, H, W) attributions. The random methods run one image per call, seeded alike, so an
    image's map does not depend on the batch it came in (the widget and the step share maps)."""
    import captum.attr as ca
    per_batch = gradient_batch_size(model, x) if method in ("integratedgradients", "smoothgrad") else 1
    if method in RANDOM_METHODS:
        return torch.cat([_captum_random(ca, model, x[i:i + 1], t[i:i + 1], method,
                                         None if base is None else base[i:i + 1], seed, per_batch)
                          for i in range(len(x))])
    if method == "saliency":
        return ca.Saliency(model).attribute(x, target=t, abs=True)
    if method == "inputxgradient":
        return ca.InputXGradient(model).attribute(x, target=t)
    if method == "integratedgradients":   # the path points in batches of GRADIENT_BATCH_BYTES
        chunk = max(1, min(len(x) * IG_STEPS, per_batch))
        return ca.IntegratedGradients(model).attribute(x, baselines=base, target=t, n_steps=IG_STEPS,
                                                       internal_batch_size=chunk)
    raise ConfigError(f"Not a Captum method: {method!r}.")


def _captum_random(ca, model: nn.Module, x: torch.Tensor, t: torch.Tensor, method: str,
                   base: Optional[torch.Tensor], seed: int, per_batch: int) -> torch.Tensor:
    """One image (1, C, H, W) of a random method, seeded; SmoothGrad's samples in batches of `per_batch`."""
    torch.manual_seed(seed)
    np.random.seed(seed)      # GradientShap draws its path points with NumPy's global generator
    if method == "smoothgrad":
        per_call = max(1, min(SMOOTHGRAD_SAMPLES, per_batch))
        return ca.NoiseTunnel(ca.Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=SMOOTHGRAD_SAMPLES,
                                                            nt_samples_batch_size=per_call,
                                                            stdevs=SMOOTHGRAD_STDEV, target=t, abs=True)
    if method == "gradientshap":
        dist = torch.cat([base, base + 0.1 * torch.randn_like(base)])   # the baseline and jittered copies
        return ca.GradientShap(model).attribute(x, baselines=dist, n_samples=GRADSHAP_SAMPLES, stdevs=0.0, target=t)
    cls = ca.Lime if method == "lime" else ca.KernelShap
    per_eval = max(1, min(PERTURBATIONS_PER_EVAL, PIXEL_BUDGET // max(1, x[0].numel())))
    return cls(model).attribute(x, baselines=base, target=t, feature_mask=superpixels(x),
                                n_samples=PERTURBATION_SAMPLES, perturbations_per_eval=per_eval)


@contextlib.contextmanager
def _numpy_state() -> Iterator[None]:
    """NumPy's global random state as it was: the seeded methods must not reseed the caller's generator."""
    state = np.random.get_state()
    try:
        yield
    finally:
        np.random.set_state(state)


@contextlib.contextmanager
def _attribution_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode with gradients on; the training flag and the parameters' gradients restored afterwards."""
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield model
    finally:
        model.train(was)
        model.zero_grad(set_to_none=True)


def attribute(model: nn.Module, inputs: torch.Tensor, targets, method: str, baseline: str = "black",
              mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None, seed: int = 0,
              batch_size: int = 32, progress: bool = False) -> np.ndarray:
    """Maps (N, H, W) float32 of `method` for class targets[i] of normalised image inputs[i] (see the module
    docstring for the aggregation and the baselines). mean/std: the normalisation, for the baseline."""
    key = check_attribution_method(method)
    x = torch.as_tensor(inputs).float()
    if x.dim() != 4:
        raise ConfigError(f"inputs must be normalised images (N, C, H, W); got {tuple(x.shape)}.")
    t = torch.as_tensor(np.asarray(targets, dtype=np.int64).reshape(-1))
    if t.shape[0] != x.shape[0]:
        raise ConfigError(f"targets must hold exactly one class per image: got {t.shape[0]} for {x.shape[0]} images.")
    if key in VIT_METHODS:
        return vit_attention_maps(model, x, rollout=key == "rollout", batch_size=batch_size)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = np.zeros((x.shape[0],) + tuple(x.shape[-2:]), np.float32)
    starts = range(0, x.shape[0], int(batch_size))
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=f"{key} attributions", unit="batch")
    spec = ATTRIBUTION_METHODS[key]
    with _attribution_mode(model), torch.random.fork_rng(devices=[]), _numpy_state():
        for s in starts:
            xb = x[s:s + batch_size].to(device).detach().clone().requires_grad_(spec.aggregation != "attention")
            base = make_baseline(xb.detach(), baseline, mean, std, seed) if spec.uses_baseline else None
            out[s:s + batch_size] = aggregate(_captum_raw(model, xb, t[s:s + batch_size].to(device), key, base, seed),
                                              spec.aggregation)
    if not np.all(np.isfinite(out)):
        raise NumericalError(f"{key} produced NaN/inf attributions; check the model's outputs for NaN/inf.")
    return out


# ----------------------------------------------------------------------------- ViT attention
def _vit_blocks(model: nn.Module) -> tuple[list[nn.Module], str, int]:
    """(attention modules of every block in order, "timm" or "torchvision", number of prefix tokens); the loader's
    LogitsWrapper (models returning tuples or dicts) is looked through."""
    from helpers.model.load import unwrap
    model = unwrap(model)
    blocks = getattr(model, "blocks", None)
    if blocks is not None and all(hasattr(b, "attn") for b in blocks):
        return [b.attn for b in blocks], "timm", int(getattr(model, "num_prefix_tokens", 1))
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if layers is not None and all(isinstance(getattr(b, "self_attention", None), nn.MultiheadAttention)
                                  for b in layers):
        return [b.self_attention for b in layers], "torchvision", 1   # torchvision ViT: one class token
    raise ConfigError("Attention maps need a vision transformer (timm VisionTransformer with `blocks[i].attn`, or "
                      "torchvision's VisionTransformer); this model has neither.")


@contextlib.contextmanager
def unfused_attention(model: nn.Module) -> Iterator[list[nn.Module]]:
    """timm's fused attention (scaled_dot_product_attention) never materialises the weights: switch
    `fused_attn` off on every module that has it while the maps are computed, and restore each flag after."""
    saved = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in saved:
            m.fused_attn = False
        yield [m for m, _ in saved]
    finally:
        for m, flag in saved:
            m.fused_attn = flag


def attention_matrices(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Every block's attention weights (N, heads, T, T), in block order, and the number of prefix tokens.
    timm: read at `attn.attn_drop` (the softmax output) with fused attention off. torchvision: its encoder calls
    MultiheadAttention with need_weights=False, so a pre-hook asks for the per-head weights instead."""
    attns, kind, prefix = _vit_blocks(model)
    store: list[Optional[torch.Tensor]] = [None] * len(attns)
    handles = []
    try:
        for i, attn in enumerate(attns):
            if kind == "timm":
                if not isinstance(getattr(attn, "attn_drop", None), nn.Module):
                    raise ConfigError("This timm attention has no attn_drop module to read the weights from.")
                handles.append(attn.attn_drop.register_forward_hook(
                    lambda m, inp, out, i=i: store.__setitem__(i, out.detach())))
            else:
                def ask(m, args, kwargs):
                    kwargs = dict(kwargs, need_weights=True, average_attn_weights=False)
                    return args, kwargs
                handles.append(attn.register_forward_pre_hook(ask, with_kwargs=True))
                handles.append(attn.register_forward_hook(
                    lambda m, inp, out, i=i: store.__setitem__(i, out[1].detach())))
        was = model.training
        model.eval()
        try:
            with unfused_attention(model), torch.no_grad():
                model(x)
        finally:
            model.train(was)
    finally:
        for h in handles:
            h.remove()
    if any(a is None for a in store):
        raise ConfigError("Some transformer blocks produced no attention weights (fused attention not switched off?).")
    return [a.float() for a in store], prefix


def rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): per block, heads averaged, A_hat = (A + I) / 2 (the residual
    connection), rows renormalised to sum to 1; the product A_hat_L @ ... @ A_hat_1 (N, T, T)."""
    result = None
    for a in attentions:
        mean = a.float().mean(dim=1)
        eye = torch.eye(mean.shape[-1], dtype=mean.dtype, device=mean.device)
        hat = (mean + eye) / 2
        hat = hat / hat.sum(dim=-1, keepdim=True)
        result = hat if result is None else hat @ result
    return result


def _cls_row_map(matrix: torch.Tensor, prefix: int, out_size: tuple[int, int]) -> np.ndarray:
    """The first (CLS) token's row over the patch tokens, as a square grid upsampled to out_size (bilinear)."""
    row = matrix[:, 0, prefix:] if prefix > 0 else matrix.mean(dim=1)   # no CLS token: mean over queries
    side = int(round(math.sqrt(row.shape[-1])))
    if side * side != row.shape[-1]:
        raise ConfigError(f"{row.shape[-1]} patch tokens do not form a square grid.")
    grid = row.reshape(-1, 1, side, side)
    up = torch.nn.functional.interpolate(grid, size=tuple(out_size), mode="bilinear", align_corners=False)
    return up[:, 0].cpu().numpy().astype(np.float32)


def vit_attention_maps(model: nn.Module, inputs: torch.Tensor, rollout: bool = False,
                       batch_size: int = 32) -> np.ndarray:
    """(N, H, W): the last block's head-averaged CLS attention over the patches, or its rollout through every
    block. Class-agnostic: attention is computed before the head."""
    x = torch.as_tensor(inputs).float()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = []
    for s in range(0, len(x), int(batch_size)):
        attns, prefix = attention_matrices(model, x[s:s + batch_size].to(device))
        matrix = _rollout(attns) if rollout else attns[-1].mean(dim=1)
        out.append(_cls_row_map(matrix, prefix, tuple(x.shape[-2:])))
    return np.concatenate(out) if out else np.zeros((0,) + tuple(x.shape[-2:]), np.float32)


_rollout = rollout   # vit_attention_maps' `rollout` flag shadows the function inside it


def is_vit(model: nn.Module) -> bool:
    try:
        _vit_blocks(model)
        return True
    except ConfigError:
        return False


def methods_for(model: nn.Module, include_slow: bool = False) -> list[str]:
    """The methods that apply to `model`: attention and rollout only for ViTs; slow ones only when asked."""
    vit = is_vit(model)
    return [m for m, spec in ATTRIBUTION_METHODS.items()
            if (include_slow or spec.cost == "fast") and (vit or m not in VIT_METHODS)]
