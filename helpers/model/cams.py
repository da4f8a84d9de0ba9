"""Class activation maps (Grad-CAM family) on top of pytorch-grad-cam (their faithfulness: faithfulness.py).

Everything here returns CAMs as float32 arrays (N, H, W) in [0, 1], min-max normalised per image
exactly as pytorch-grad-cam does it. Batches always get exactly one target per image: a shorter
target list would make pytorch-grad-cam silently produce all-zero CAMs for the remaining images.

For plain Grad-CAM on a model whose head is global-average-pool -> one Linear layer (ResNets),
the gradients are known in closed form (dlogit_c/dA_k = W[c,k]/(h*w) at every position), so
`CamEngine` computes the CAM from one forward pass without backward. That fast path is checked
against pytorch-grad-cam on the first batch and abandoned if the two disagree.

Finding the target layer lives in layers.py; drawing CAMs over images in helpers/plots/overlay.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import types
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from pytorch_grad_cam import (EigenCAM, EigenGradCAM, FinerCAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM,
                              XGradCAM)
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget, FinerWeightedTarget

from helpers.errors import ConfigError, NumericalError
from helpers.model.cam_path import CamPath
from helpers.model.cam_store import output_map
from helpers.model.layers import (check_input_shape, final_linear, float32_model, probe, probe_input,
                                  reshape_transform_for, resolve_target_layer, saved_bytes_per_image, weight_dtype)
from helpers.model.tail import (TailSplit, gradcam_from_images, gradcam_from_tail, gradcam_in_batches, head_values,
                                split_at_layer)

CAM_METHODS: dict[str, type] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "layercam": LayerCAM,
    "xgradcam": XGradCAM,
    "eigencam": EigenCAM,
    "scorecam": ScoreCAM,
    "finercam": FinerCAM,
    "eigengradcam": EigenGradCAM,
}
"""CAM method name -> pytorch-grad-cam class.

"eigencam" is class-agnostic: it is the first principal component of the layer's activations, so
the map is the same whatever target class is asked for. "finercam" explains the target class
against the classes whose logits are closest to it (FinerCAM's default comparison), with Grad-CAM
as the base method. "scorecam" needs one forward pass per channel of the target layer (slow). "eigengradcam" is
the first principal component of activations x gradients of the target class: class-discriminative, unlike
"eigencam"."""

CLASS_AGNOSTIC_METHODS = {"eigencam"}

# Methods whose pytorch-grad-cam class can serve as FinerCAM's base (they take gradients of the target).
_GRADIENT_METHODS = {"gradcam", "gradcam++", "layercam", "xgradcam"}

FAST_PATH_TOLERANCE = 1e-4
LIBRARY_BATCH_BYTES = 1 << 30   # what autograd may keep for one library CAM batch's backward pass


def check_method(method: str) -> str:
    """The method name, lower-cased; ConfigError listing the valid names if it is unknown."""
    key = str(method).strip().lower()
    if key not in CAM_METHODS:
        raise ConfigError(f"Unknown CAM method {method!r}. Choose one of: {', '.join(CAM_METHODS)}.")
    return key


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
    return scale_like_library(cam.cpu().numpy(), out_size)


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
    return scale_like_library(cam.cpu().numpy(), out_size)


def scale_like_library(cam: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """BaseCAM: per-layer min-max + cv2 resize, clip at 0, average over (one) layer, min-max again."""
    height, width = out_size
    scaled = np.maximum(scale_cam_image(cam, (int(width), int(height))), 0)
    return scale_cam_image(scaled)


def gap_linear_head(model: nn.Module, layer: nn.Module, input_shape,
                    num_classes: int) -> tuple[Optional[nn.Linear], str]:
    """(the model's final Linear, "") when what runs after `layer` is global average pooling, optional
    Flatten/Dropout/Identity and exactly that one nn.Linear producing the model output; else (None, why).
    Module types are checked on the executed modules, and the semantics numerically on a random probe
    (functional ops between modules are invisible to hooks, hence the numeric check)."""
    leaves = [m for m in model.modules() if not list(m.children()) and m is not layer
              and not isinstance(m, torch.jit.ScriptModule)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2,) + tuple(int(s) for s in input_shape), generator=gen)
    calls, out = probe(model, x, only=[layer] + leaves)
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
    if lin.module is not final_linear(model, num_classes):   # the head every other step reads (features, weights)
        return None, "the Linear after the target layer is not the model's final Linear"
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


def _as_float32(transform):
    """A pytorch-grad-cam reshape_transform that also makes the activations and gradients it stores float32
    (it sees them only as they are stored: the model's own forward and backward are unchanged)."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return (transform(t) if transform is not None else t).float()
    return cast


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


def forward_with_activations(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, `layer`'s output) of one forward pass without autograd: what the fast CAM paths need."""
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    return logits, store["a"]


def library_cams(model: nn.Module, layer: nn.Module, cls: type, xb: torch.Tensor, targets: list,
                 reshape_transform, method: str, batch_size: int) -> np.ndarray:
    """One pytorch-grad-cam call with exactly one target per image; hooks removed afterwards
    (left registered they would record every later forward pass of the model)."""
    if cls is FinerCAM:
        base = CAM_METHODS[method] if method in _GRADIENT_METHODS else GradCAM
        cam = FinerCAM(model, [layer], reshape_transform=reshape_transform, base_method=base)
        hooks = cam.base_cam.activations_and_grads
    else:
        cam = cls(model, [layer], reshape_transform=reshape_transform)
        hooks = cam.activations_and_grads
        if isinstance(cam, ScoreCAM):
            cam.batch_size = batch_size
    if not any(p.requires_grad for p in model.parameters()):
        xb = xb.detach().clone().requires_grad_(True)   # frozen weights: gradients must still reach the layer
    try:
        with torch.enable_grad(), _quiet_scorecam():
            result = cam(input_tensor=xb, targets=targets)
    finally:
        hooks.release()
        model.zero_grad(set_to_none=True)
    return np.asarray(result, dtype=np.float32)


def _finer_targets(tb: np.ndarray, pb: np.ndarray, logits: Optional[np.ndarray]) -> list:
    """FinerCAM's targets: true vs predicted, or the true class vs its nearest classes where they agree."""
    return [FinerWeightedTarget(int(t), [int(p)] if t != p else _nearest_classes(logits[i], int(t)), 1.0)
            for i, (t, p) in enumerate(zip(tb, pb))]


def finercam_from_head(model: nn.Module, layer: nn.Module, weight: torch.Tensor, xb: torch.Tensor,
                       tb: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """FinerCAM (Grad-CAM base) for a GAP -> Linear head (`weight` its (C, K)): one forward pass, then the targets'
    gradients with respect to the logits only (gradcam_from_logit_gradients); no backward pass through the model."""
    logits, activations = forward_with_activations(model, layer, xb)
    logits = logits.float()
    z = logits.clone().requires_grad_(True)
    targets = _finer_targets(tb, pb, logits.cpu().numpy())
    with torch.enable_grad():   # as FinerCAM: the sum over images of each image's target
        (grads,) = torch.autograd.grad(sum(target(zi) for target, zi in zip(targets, z)), z)
    return gradcam_from_logit_gradients(activations.float(), weight.detach().float(), grads, tuple(xb.shape[-2:]))


def finercam_from_tail(split: TailSplit, xb: torch.Tensor, tb: np.ndarray, pb: np.ndarray,
                       reshape_transform: Optional[Callable]) -> np.ndarray:
    """FinerCAM (Grad-CAM base) from a no-grad forward of the torch.fx head part, then autograd through the tail
    only, with FinerCAM's own targets: no backward pass through the whole model (library_cams' FinerCAM)."""
    return gradcam_from_tail(split, head_values(split, xb), lambda logits: _finer_targets(tb, pb, logits),
                             tuple(xb.shape[-2:]), reshape_transform)


def exact_finercam(tail: Optional[TailSplit], model: nn.Module, layer: nn.Module, linear: Optional[nn.Linear],
                   reshape_transform: Optional[Callable], xb: torch.Tensor, tb: np.ndarray,
                   pb: np.ndarray) -> np.ndarray:
    """FinerCAM without the library: through the torch.fx tail when there is one, else from a GAP -> Linear head."""
    if tail is not None:
        return finercam_from_tail(tail, xb, tb, pb, reshape_transform)
    return finercam_from_head(model, layer, linear.weight, xb, tb, pb)


def library_batch_size(model: nn.Module, input_shape, batch_size: int, device) -> int:
    """At most `batch_size` images whose backward pass keeps LIBRARY_BATCH_BYTES: the library runs it through the
    whole model (Swin-T at 224 px in batches of 128 peaked at 17 GB RSS)."""
    return max(1, min(int(batch_size), LIBRARY_BATCH_BYTES // saved_bytes_per_image(model, input_shape, device)))


def _finite(out: np.ndarray, method: str, layer_name: str) -> np.ndarray:
    if not np.all(np.isfinite(out)):
        raise NumericalError(f"{method} produced NaN/inf CAMs at layer {layer_name}; "
                             "check the model's outputs for NaN/inf.")
    return out


class CamEngine:
    """Computes CAMs for one model, method and target layer, in batches.

    Attributes: `method`, `layer_name`, `layer`, `reshape_transform` (None for CNNs), `num_classes`,
    `cam_path` (a CamPath: which computation runs, the fast exact Grad-CAM, the torch.fx tail or pytorch-grad-cam;
    `path` is its text), `fast_max_diff` (fast vs library on the verification batch), `dtype` (the weights' dtype
    the CAMs run with) and `dtype_note` (None for float32; a float16/bfloat16 model runs as a float32 copy).
    `batch_size`: on the library path no more than LIBRARY_BATCH_BYTES of saved activations per batch.
    `tail_of`: an engine on the same architecture whose torch.fx split this one re-roots instead of tracing."""

    def __init__(self, model: nn.Module, method: str = "gradcam", target_layer: Optional[str] = None,
                 input_shape: Sequence[int] = (3, 32, 32), batch_size: int = 64, device="cpu", fast_path: bool = True,
                 tail_of: Optional["CamEngine"] = None):
        self.method = check_method(method)
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1; got {batch_size}.")
        check_input_shape(input_shape)
        self.batch_size, self.input_shape = int(batch_size), tuple(int(s) for s in input_shape)
        self.device = torch.device(device)
        # float16/bfloat16 weights: a float32 copy unless the forward converts its input itself (layers.float32_model)
        self.model, self.dtype_note = float32_model(model.to(self.device).eval(),
                                                    [probe_input(self.input_shape).to(self.device)])
        self.dtype = weight_dtype(self.model.eval())   # eval: the CAM classes put it in eval mode anyway
        self.layer_name, self.layer = resolve_target_layer(self.model, target_layer, self.input_shape)
        self.reshape_transform = reshape_transform_for(self.model, self.layer, self.input_shape)
        # pytorch-grad-cam turns the stored activations and gradients into NumPy arrays, which have no bfloat16.
        self._cam_transform = (self.reshape_transform if self.dtype == torch.float32
                               else _as_float32(self.reshape_transform))
        _, out = probe(self.model, probe_input(self.input_shape), only=[])
        if not (isinstance(out, torch.Tensor) and out.dim() == 2):
            raise ConfigError(f"The model must return logits (batch, classes); got {type(out).__name__} "
                              f"{tuple(getattr(out, 'shape', ()))}.")
        self.num_classes = int(out.shape[1])
        self.fast_max_diff: Optional[float] = None
        self._linear: Optional[nn.Linear] = None
        self._tail: Optional[TailSplit] = None   # Grad-CAM through the model after the target layer only
        self._verified = self._finer_verified = self._finer_fast = False   # _finer: the same for FinerCAM
        self.finer_fast_max_diff: Optional[float] = None
        reason = "fast_path=False"
        if self.method != "gradcam":
            reason = ""
        elif fast_path and self.reshape_transform is not None:
            reason = "fast path needs a CNN feature map"
        elif fast_path:
            self._linear, reason = gap_linear_head(self.model, self.layer, self.input_shape, self.num_classes)
        if fast_path and self.method == "gradcam" and self._linear is None:
            like = tail_of.tail_split if tail_of is not None and tail_of.layer_name == self.layer_name else None
            self._tail, why = split_at_layer(self.model, self.layer, self.input_shape, self.dtype, like=like)
            reason = reason if self._tail is not None else f"{reason}; torch.fx tail not used: {why}"
        if self._tail is not None:
            self.cam_path = CamPath("tail", reason=reason)
        elif self._linear is None:
            self._set_library_path(reason)
        else:
            self.cam_path = CamPath("fast")
        self._own_path = self.cam_path   # CamStore may show a cached run's path until this one computes

    @property
    def path(self) -> str:
        """The CAM path as the reports print it (`cam_path` is the same, typed)."""
        return str(self.cam_path)

    def _set_library_path(self, reason: str) -> None:
        self._linear = self._tail = None
        self.batch_size = library_batch_size(self.model, self.input_shape, self.batch_size, self.device)
        self.cam_path = CamPath("library", library_class=CAM_METHODS[self.method].__name__, reason=reason)

    # -- public
    def compute(self, inputs: torch.Tensor, targets, progress: bool = True) -> np.ndarray:
        """CAMs (N, H, W) float32 in [0, 1] for normalised inputs (N, C, H, W), explaining class
        targets[i] for image i (ignored by class-agnostic methods such as eigencam)."""
        x = self._as_inputs(inputs)
        t = _as_targets(targets, x.shape[0], self.num_classes)
        if self.exact and not self._verified and len(x):
            self._verify_fast(x[:4], t[:4])
        return self._batched(x, lambda xb, tb: self._one_batch(xb, tb), t, progress)

    fast = property(lambda self: self._linear is not None, doc="the fast exact path is in use (not yet refuted)")

    head_weight = property(lambda self: self._linear.weight if self._linear is not None else None)   # fast path: (C, K)

    @property
    def exact(self) -> bool:
        """True while an exact shortcut (fast path or torch.fx tail) is in use."""
        return self._linear is not None or self._tail is not None

    @property
    def inference_keep(self):
        """The `keep` rule for compute_from_activations: the fast path's 4-D map, the tail's inputs, or None."""
        return output_map if self._linear is not None else self._tail.hook_keep if self._tail is not None else None

    def compute_from_activations(self, inputs: Callable[[], torch.Tensor], activations, targets,
                                 out_size) -> Optional[np.ndarray]:
        """Fast- or tail-path CAMs (N, *out_size) from what `inference_keep` kept of N images in the pass (maps; the
        tail's inputs). `inputs()`: the same images, decoded only for the one-time check against pytorch-grad-cam.
        None when neither path applies or the check fails: call compute() then."""
        if not self.exact:
            return None
        n = (activations if isinstance(activations, tuple) else (activations,))[0].shape[0]
        t = _as_targets(targets, n, self.num_classes)
        if not self._verified and n:
            self._verify_fast(self._as_inputs(inputs()[:4]), t[:4])
            if not self.exact:
                return None
        out = np.zeros((n,) + tuple(int(v) for v in out_size), np.float32)
        if self._tail is not None:
            out[:] = gradcam_in_batches(self._tail, activations, t, out.shape[1:], self.reshape_transform,
                                        self.batch_size, self.device)
        else:
            with torch.inference_mode():   # captured activations may be inference tensors
                weight = self._linear.weight.float()
                for s in range(0, n, 256):
                    out[s:s + 256] = gradcam_from_activations(activations[s:s + 256].to(self.device).float(),
                                                              weight, t[s:s + 256], out.shape[1:])
        return _finite(out, self.method, self.layer_name)

    tail_split = property(lambda self: self._tail)   # the torch.fx TailSplit on the tail path, else None

    def compute_shared(self, images: torch.Tensor, rows, targets, progress: bool = True) -> np.ndarray:
        """CAMs (len(rows), H, W) for the requests (images[rows[i]], targets[i]): on the fast and tail paths each
        image runs the model (or the tail's head) once for all its classes (failure modes ask true and predicted)."""
        x = self._as_inputs(images)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        t = _as_targets(targets, len(rows), self.num_classes)
        if len(rows) and self.exact and not self._verified:
            self._verify_fast(x[torch.as_tensor(rows[:4])], t[:4])
        if not self.exact or not len(rows):
            return self.compute(x[torch.as_tensor(rows)], t, progress=progress)
        size = tuple(x.shape[-2:])
        out = np.zeros((len(rows),) + size, np.float32)
        for s in range(0, len(x), self.batch_size):   # a batch of images, with every request on them
            sel = np.flatnonzero((rows >= s) & (rows < s + self.batch_size))
            if not len(sel):
                continue
            xb = x[s:s + self.batch_size].to(self.device)
            local = torch.as_tensor(rows[sel] - s, device=self.device)
            if self._tail is not None:
                kept = tuple(v[local] for v in head_values(self._tail, xb))
                out[sel] = gradcam_in_batches(self._tail, kept, t[sel], size, self.reshape_transform,
                                              self.batch_size, self.device)
            else:
                _, acts = self._forward_with_activations(xb)
                out[sel] = gradcam_from_activations(acts.float()[local], self._linear.weight.detach().float(),
                                                    t[sel], size)
        return _finite(out, self.method, self.layer_name)

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
        if self.exact and not self._finer_verified and len(x):
            self._verify_finer_fast(x[:4], t[:4], p[:4])
        batch = self._finer_fast_batch if self._finer_fast and self.exact else self._finer_batch
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
        return _finite(out, self.method, self.layer_name)

    def _one_batch(self, xb: torch.Tensor, tb: np.ndarray) -> np.ndarray:
        if self.exact:
            return self._fast_batch(xb, tb)
        if self.method == "finercam":
            logits = self._logits(xb)
            targets = [FinerWeightedTarget(int(c), _nearest_classes(logits[i], int(c)), 1.0)
                       for i, c in enumerate(tb)]
        else:
            targets = [ClassifierOutputTarget(int(c)) for c in tb]
        return self._library(CAM_METHODS[self.method], xb, targets)

    def _finer_batch(self, xb: torch.Tensor, tb: np.ndarray, pb: np.ndarray) -> np.ndarray:
        logits = self._logits(xb) if np.any(tb == pb) else None
        return self._library(FinerCAM, xb, _finer_targets(tb, pb, logits))

    def _finer_fast_batch(self, xb: torch.Tensor, tb: np.ndarray, pb: np.ndarray) -> np.ndarray:
        return exact_finercam(self._tail, self.model, self.layer, self._linear, self.reshape_transform, xb, tb, pb)

    def _verify_finer_fast(self, xb: torch.Tensor, tb: np.ndarray, pb: np.ndarray) -> None:
        """Compare the exact FinerCAM (fast path or tail) with pytorch-grad-cam's on a few real images, for the
        requested pairs and for true = pred (nearest-class comparison); use the library from then on if they differ."""
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
        return library_cams(self.model, self.layer, cls, xb, targets, self._cam_transform, self.method,
                            self.batch_size)

    def _forward_with_activations(self, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_with_activations(self.model, self.layer, xb)

    def _fast_batch(self, xb: torch.Tensor, tb: np.ndarray) -> np.ndarray:
        if self._tail is not None:   # a forward of the head part, then autograd through the tail only
            return gradcam_from_images(self._tail, xb, tb, self.reshape_transform)
        _, activations = self._forward_with_activations(xb)
        return gradcam_from_activations(activations.float(), self._linear.weight.detach().float(), tb,
                                        tuple(xb.shape[-2:]))

    def adopt_verification(self, other: "CamEngine") -> None:
        """Take `other`'s fast-path verdict: for a copy of its model with some weights re-initialised (the same
        modules, so the same GAP -> Linear structure the verdict is about). Saves the library Grad-CAM calls of
        _verify_fast: 2 x 7 s of a 2,000-image 224 px ResNet-18 run's randomisation test."""
        if self.exact and other.exact and other.cam_path.verified and not self._verified:
            self.fast_max_diff = other.fast_max_diff
            self.cam_path = dataclasses.replace(self._own_path, verified=True)
            self._verified = True

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
            self._set_library_path(f"{self.cam_path.kind} CAM differed from pytorch-grad-cam by {diff:.2g}")
        else:
            self.cam_path = dataclasses.replace(self._own_path, verified=True)
        self._verified = True
