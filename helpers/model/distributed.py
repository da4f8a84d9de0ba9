"""Multi-process inference under torchrun: `torchrun --nproc_per_node=N -m helpers analyze ...`.

Each rank runs the inference pass on one contiguous shard of the test set, in whole batches, so every batch
is the batch a single process would run (a model may depend on its batch, and the same batches give the same
floating-point logits). Logits, probabilities, features, the class galleries' kept candidates and the pass's
own CAMs are gathered on rank 0, which continues with exactly the predictions and gallery choices of a
single-process run; the other ranks write nothing. Backend gloo on the CPU, nccl on CUDA (each rank on
cuda:LOCAL_RANK).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from helpers.model.inference import Predictions, resolve_device

if TYPE_CHECKING:
    from helpers.model.cam_store import GalleryActivations


@dataclass(frozen=True)
class World:
    """This process's place among the torchrun processes."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env(environ: Mapping[str, str] = os.environ) -> Optional[World]:
    """The torchrun variables (WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE), or None outside torchrun or
    with a single process (which then runs exactly the single-process code)."""
    size = int(environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return None
    rank = int(environ["RANK"])
    local_rank = int(environ.get("LOCAL_RANK", rank))
    return World(rank, size, local_rank, int(environ.get("LOCAL_WORLD_SIZE", size)))


def is_main_process(environ: Mapping[str, str] = os.environ) -> bool:
    """True in a single process and on rank 0: the process that owns OUTPUT_DIR."""
    world = world_from_env(environ)
    return world is None or world.is_main


def start(device: str) -> tuple[Optional[World], str]:
    """Join the torchrun process group: (this rank's World, its DEVICE), or (None, `device`) outside torchrun.
    gloo on the CPU; nccl on CUDA, each rank on cuda:LOCAL_RANK (selected first: nccl's collectives use the
    current device). Call once, before the model is loaded."""
    world = world_from_env()
    if world is None:
        return None, device
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        if resolved.type == "cuda":
            dist.init_process_group("nccl", device_id=resolved)
        else:
            dist.init_process_group("gloo")
    return world, str(resolved) if resolved.type == "cuda" else device


def current() -> Optional[World]:
    """This rank's World once start() joined the process group, else None (a single process)."""
    return world_from_env() if dist.is_available() and dist.is_initialized() else None


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_bounds(n: int, world_size: int, rank: int, batch_size: int) -> tuple[int, int]:
    """Images [a, b) of `rank`: contiguous, in whole batches of `batch_size` (the last, partial batch stays
    last), the batches split as equally as possible (the first ranks take one more)."""
    n_batches = -(-n // batch_size) if n else 0
    per, extra = divmod(n_batches, world_size)
    first = rank * per + min(rank, extra)
    last = first + per + (1 if rank < extra else 0)
    return min(n, first * batch_size), min(n, last * batch_size)


def main_decides(world: World, value: bool) -> bool:
    """Rank 0's `value` on every rank (others pass anything): e.g. whether rank 0 found the predictions cached."""
    box = [bool(value) if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def to_device(value: Any, device: torch.device | str) -> Any:
    """`value` with every tensor in it (nested in tuples, lists and dicts) moved to `device`; anything else
    as it is. Gallery map values are opaque to this module: whatever structure the store keeps travels."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


class OffsetGallery:
    """An inference-pass observer (a GalleryActivations, a PassCams) seen through one shard: batch offsets become
    global image indices."""

    def __init__(self, gallery, offset: int):
        self.gallery, self.offset = gallery, int(offset)

    def capture(self):
        return self.gallery.capture()

    def update(self, start: int, probs: np.ndarray, labels: np.ndarray, preds: np.ndarray) -> None:
        self.gallery.update(self.offset + start, probs, labels, preds)


def gather_predictions(world: World, part: Predictions) -> Optional[Predictions]:
    """Every rank's Predictions concatenated in rank order (= image order) on rank 0; None elsewhere.
    Features are kept only when every shard has them (as run_inference keeps them only for every batch)."""
    arrays = {"logits": part.logits, "probs": part.probs, "preds": part.preds, "labels": part.labels,
              "features": part.features}
    parts = [None] * world.world_size if world.is_main else None
    dist.gather_object(arrays, parts, dst=0)
    if not world.is_main:
        return None
    parts = [p for p in parts if len(p["labels"])]   # an empty shard's (0, 0) logits do not concatenate
    if not parts:
        return part
    features = [p["features"] for p in parts]
    return Predictions(
        logits=np.concatenate([p["logits"] for p in parts]), probs=np.concatenate([p["probs"] for p in parts]),
        preds=np.concatenate([p["preds"] for p in parts]), labels=np.concatenate([p["labels"] for p in parts]),
        features=None if any(f is None for f in features) else np.concatenate(features))


def _gather_states(world: World, state: dict) -> Optional[list]:
    """Every rank's `state` in rank order on rank 0; None elsewhere."""
    states = [None] * world.world_size if world.is_main else None
    dist.gather_object(state, states, dst=0)
    return states


def gather_gallery(world: World, gallery: "GalleryActivations", device: torch.device | str) -> None:
    """Rank 0's `gallery` becomes the selection over every rank's kept candidates (exactly the whole-set
    selection: see GalleryActivations), their maps on `device`; the other ranks send theirs."""
    state = gallery.kept_state()
    if not world.is_main:
        state["maps"] = to_device(state["maps"], "cpu")   # rank 0 may not see this rank's GPU
    states = _gather_states(world, state)
    if world.is_main:
        for other in states[1:]:
            other["maps"] = to_device(other["maps"], device)
        gallery.merge_states(states)


def gather_observer(world: World, observer) -> None:
    """Rank 0's observer (a PassCams or PassInputs: NumPy arrays or CPU tensors) takes in every other rank's
    kept_state()."""
    states = _gather_states(world, observer.kept_state())
    if world.is_main:
        observer.merge_states(states[1:])


def shard_of(world: World, items, batch_size: int) -> tuple[int, int, Any]:
    """(a, b, this rank's items [a, b)): shard_bounds' slice, a `subset` for streamed images (not decoded here)."""
    a, b = shard_bounds(len(items), world.world_size, world.rank, batch_size)
    return a, b, (items.subset(a, b) if hasattr(items, "subset") else items[a:b])


@contextlib.contextmanager
def node_cores(world: World) -> Iterator[None]:
    """The torch threads of the block: the free cores each rank measured, shared by all the ranks on this node."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // world.local_world_size))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sharded(world: World, run_inference: Callable[..., Predictions]) -> Callable[..., Predictions]:
    """`run_inference` with the same arguments, run by every rank on its shard and gathered: the full
    Predictions (and, with a `gallery`, the whole-set gallery selection) on rank 0, the shard's elsewhere."""
    def run(model, inputs, labels, batch_size: int = 256, device="cpu", progress: bool = True,
            gallery: Optional["GalleryActivations"] = None, observers=(), **kwargs) -> Predictions:
        a, b, shard = shard_of(world, inputs, batch_size)
        with node_cores(world):
            part = run_inference(model, shard, np.asarray(labels)[a:b], batch_size=batch_size, device=device,
                                 progress=progress and world.is_main,
                                 gallery=OffsetGallery(gallery, a) if gallery is not None else None,
                                 observers=[OffsetGallery(o, a) for o in observers], **kwargs)
        full = gather_predictions(world, part)
        if gallery is not None:
            gather_gallery(world, gallery, device)
        for observer in observers:   # the same observers on every rank, in the same order
            gather_observer(world, observer)
        return full if world.is_main else part
    return run


@contextlib.contextmanager
def main_first(world: World, ordered: bool = True) -> Iterator[None]:
    """With `ordered`, rank 0 runs the block before the other ranks start it (one download into a folder they
    share); without, every rank at once."""
    if ordered and not world.is_main:
        dist.barrier()
    try:
        yield
    finally:
        if ordered and world.is_main:
            dist.barrier()


def all_agree(world: World, value: bool) -> bool:
    """True on every rank when `value` is true on every rank (e.g. each one read the training split)."""
    values = [None] * world.world_size
    dist.all_gather_object(values, bool(value))
    return all(values)


def sharded_features(world: World, feature_pass: Callable[..., Optional[np.ndarray]]
                     ) -> Callable[..., Optional[np.ndarray]]:
    """`feature_pass` (helpers.model.inference.feature_pass) with the same arguments, run by every rank on its
    shard of the images and gathered in image order: every image's features on rank 0 (None when the model
    gives none), the shard's elsewhere. Each rank holds the whole image set (streamed: paths only)."""
    def run(model, images, mean, std, batch_size: int = 256, device="cpu", progress: bool = True, **kwargs):
        a, b, shard = shard_of(world, images, batch_size)
        part, failed = None, ""
        try:
            with node_cores(world):
                part = feature_pass(model, shard, mean, std, batch_size=batch_size, device=device,
                                    progress=progress and world.is_main, **kwargs)
        except Exception as exc:   # raised below, once every rank has reached the gather (none waits for it)
            failed = f"{type(exc).__name__}: {exc}"
        states = _gather_states(world, {"n": b - a, "features": part, "failed": failed})
        if failed or (world.is_main and any(s["failed"] for s in states)):
            why = failed or next(f"rank {r}: {s['failed']}" for r, s in enumerate(states) if s["failed"])
            raise RuntimeError(f"The sharded feature pass failed ({why}).")
        if not world.is_main:
            return part
        states = [s for s in states if s["n"]]   # an empty shard has no features to concatenate
        if not states or any(s["features"] is None for s in states):
            return None
        return np.concatenate([s["features"] for s in states])
    return run
