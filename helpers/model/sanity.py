"""Does the model behave as the analysis assumes? One check on a handful of real images, before inference.

The analysis reads the model's output as logits of one image each, computed by a model in eval mode. Models
that break this silently change every number, so `check_model_behaviour` tells them apart:

- output rows in [0, 1] that sum to 1: the forward ends in softmax. Read as logits they would be softmaxed a
  second time (confidences near 1/C, ECE near 0), so the model is wrapped in `ProbabilitiesToLogits`, whose
  log(p) are logits up to a per-image constant: softmax gives the model's own probabilities back, and the
  CAMs explain log p_c (Grad-CAM of p_c is the same map, as the gradient only gains a positive factor 1/p_c).
  The report's model line says so. Log-probabilities (log_softmax) need nothing: they are logits already.
- an image scored alone and inside a batch gives different outputs: the forward uses batch statistics
  (x - x.mean(0), BatchNorm in train mode or without running statistics) or is random: NumericalError.
- the model's normalisation statistics (BatchNorm running_mean/var, num_batches_tracked) changed during the
  pass, or modules are left in training mode and the output then depends on the batch or is random: the
  forward calls .train() or updates statistics: NumericalError. (A .train() that changes no number, in a model
  without BatchNorm or dropout, is let through.)

Cost: one forward pass of PROBE_IMAGES images and one of a single image (a second single image only when the
two disagree), plus a copy of the buffers; the buffers and training flags are restored afterwards.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch

from helpers.errors import NumericalError
from helpers.model.layers import LOW_PRECISION, model_device, weight_dtype
from helpers.model.load import LoadedModel, LogitsWrapper, extract_logits

PROBE_IMAGES = 8

PROBABILITIES_NOTE = ("the model's forward returns probabilities (its output rows are in [0, 1] and sum to 1: it "
                      "ends in softmax); the analysis takes their log as logits, so the probabilities, confidences "
                      "and ECE are the model's own. Return logits from forward to analyse the logits themselves")


@dataclass
class ModelCheck:
    output: str             # "logits", "log-probabilities" or "probabilities" (then wrapped in ProbabilitiesToLogits)
    dtype: torch.dtype      # the weights' dtype
    max_batch_diff: float   # largest |output alone - output in the batch| of the probe image
    seconds: float          # what the check cost
    note: Optional[str]     # what the report says about the model, when anything


class ProbabilitiesToLogits(LogitsWrapper):
    """Wraps a model whose forward returns probabilities: forward returns log(p) in float32 (p clamped at the
    smallest positive float32, so a probability that underflowed to 0 gives about -87, not -inf)."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        p = extract_logits(self.model(*args, **kwargs)).float()
        return torch.log(p.clamp_min(torch.finfo(torch.float32).tiny))


def output_kind(out: torch.Tensor, tol: float = 1e-3) -> str:
    """"probabilities" (every row in [0, 1], summing to 1), "log-probabilities" (every row <= 0 with exp summing
    to 1) or "logits", judged on the finite rows of a (N, C) output with C >= 2."""
    z = out.detach().float()
    z = z[torch.isfinite(z).all(dim=1)] if z.dim() == 2 else z[:0]
    if z.numel() == 0 or z.shape[1] < 2:
        return "logits"
    if bool((z >= -tol).all() and (z <= 1 + tol).all()) and bool(((z.sum(dim=1) - 1).abs() <= tol).all()):
        return "probabilities"
    if bool((z <= tol).all()) and bool((torch.logsumexp(z, dim=1).abs() <= tol).all()):
        return "log-probabilities"
    return "logits"


STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _statistics(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The normalisation statistics among the module's buffers (BatchNorm's running_mean, running_var,
    num_batches_tracked, also in subclasses and InstanceNorm with track_running_stats): small, copied per check."""
    return [(name, b) for name, b in module.named_buffers() if name.rsplit(".", 1)[-1] in STATISTICS]


def _same(a: torch.Tensor, b: torch.Tensor, tol: float) -> tuple[bool, float]:
    """(a and b agree within tol relative to their scale, the largest difference); NaN/inf must sit alike."""
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if a.shape != b.shape or not torch.equal(fa, fb):
        return False, float("inf")
    if not bool(fa.any()):
        return True, 0.0
    diff = float((a[fa] - b[fb]).abs().max())
    scale = float(a[fa].abs().max())
    return diff <= tol * (1.0 + scale), diff


def _train_mode_error(trained: list[str], changed: list[str]) -> NumericalError:
    where = []
    if trained:
        where.append(f"{len(trained)} modules are in training mode after it (first: {', '.join(trained[:3])})")
    if changed:
        where.append(f"it changed {len(changed)} buffers (first: {', '.join(changed[:3])})")
    return NumericalError(
        "The model puts itself in train mode or updates its statistics during its forward pass: "
        + "; ".join(where) + ". BatchNorm then normalises each batch with its own statistics and overwrites its "
        "running averages, and dropout is active, so every prediction, CAM and figure would depend on the batch "
        "and change from run to run. Stopping before writing misleading figures. Remove the .train() call (or "
        "F.batch_norm(..., training=True)) from the model's forward, and call model.eval() before analysing it.")


def _batch_error(diff: float, n: int, random: bool) -> NumericalError:
    if random:
        return NumericalError(
            f"The model's output for the same image differs between two identical forward passes (by up to "
            f"{diff:.3g}): its forward is random in eval mode (e.g. F.dropout(x, training=True) or added noise), so "
            "every prediction and CAM would change from run to run. Stopping before writing misleading figures. "
            "Make the forward deterministic in eval mode (nn.Dropout, or F.dropout(x, training=self.training)).")
    return NumericalError(
        f"The model's output for an image depends on the other images in its batch: image 0 scored alone and "
        f"inside a batch of {n} gives logits that differ by up to {diff:.3g}. Its forward uses batch statistics "
        "(e.g. x - x.mean(0), BatchNorm in train mode or with track_running_stats=False), so the predictions and "
        "CAMs would depend on BATCH_SIZE and on which images share a batch. Stopping before writing misleading "
        "figures. Normalise with fixed statistics (BatchNorm's running averages: call model.eval(), and no "
        ".train() in forward) or per image.")


def check_model_behaviour(loaded: LoadedModel, inputs: torch.Tensor, n: int = PROBE_IMAGES) -> ModelCheck:
    """Check `loaded.module` on the first `n` of `inputs` (normalised N, C, H, W) as the module docstring says:
    raises NumericalError for batch-dependent, random or self-training models; wraps a model returning
    probabilities in ProbabilitiesToLogits (loaded.module, and a note appended to loaded.source, which the
    reports print; also a UserWarning). Returns what it found."""
    start = time.perf_counter()
    module = loaded.module
    dtype = weight_dtype(module)
    x = inputs[:n].to(model_device(module))
    if len(x) == 0:
        return ModelCheck("logits", dtype, 0.0, time.perf_counter() - start, None)
    # float32 on the CPU agrees to ~1e-6; CUDA may run float32 convolutions in TF32 (~1e-3 per operation).
    tol = 3e-2 if dtype in LOW_PRECISION else 1e-3 if x.device.type == "cpu" else 1e-2
    buffers = {name: b.detach().clone() for name, b in _statistics(module)}
    flags = [(m, m.training) for m in module.modules()]
    failure: Optional[BaseException] = None
    try:
        with torch.no_grad():
            batch = extract_logits(module(x)).float()
            try:
                single = extract_logits(module(x[:1])).float()
            except Exception as exc:   # e.g. BatchNorm1d in train mode cannot take one image
                failure, single = exc, None
        trained = [name or type(module).__name__ for name, m in module.named_modules() if m.training]
        current = dict(_statistics(module))
        changed = [name for name, b in buffers.items()
                   if name in current and not torch.equal(current[name].detach(), b)]
    finally:
        with torch.no_grad():
            for name, b in _statistics(module):
                if name in buffers and b.shape == buffers[name].shape:
                    b.copy_(buffers[name])
        for m, flag in flags:
            m.training = flag
    if changed or (trained and failure is not None):
        raise _train_mode_error(trained, changed)
    if failure is not None:
        raise failure
    same, diff = _same(batch[:1], single, tol)
    if not same:
        if trained:   # e.g. dropout switched on by a .train() in forward
            raise _train_mode_error(trained, changed)
        with torch.no_grad():
            again = extract_logits(module(x[:1])).float()
        consistent, rdiff = _same(single, again, tol)
        raise _batch_error(diff if consistent else rdiff, len(x), random=not consistent)
    kind = output_kind(batch, tol)
    note = None
    if kind == "probabilities":
        loaded.module = ProbabilitiesToLogits(module).eval()
        note = PROBABILITIES_NOTE
        loaded.source = f"{loaded.source} [{note}]"
        warnings.warn(note[0].upper() + note[1:] + ".", UserWarning, stacklevel=2)
    return ModelCheck(kind, dtype, diff, time.perf_counter() - start, note)
