"""What the CAM engine's target layer saw of the test images during the inference pass, kept within a memory
budget, so that the CAMs the "why" steps ask for later (failure modes, confusion cells, context borders, CAM
trust) start from there instead of a second forward pass through the model.

On the torch.fx tail path (transformers, non-GAP heads) a CAM after the pass otherwise re-runs the model up to
the target layer: in a 2,000-image 224 px bench, 1,216 of Swin-T's 1,419 CAMs, at ~93 ms of trunk each. What is
kept is what the tail starts from (TailSplit.kept_from_call), ~150 KB per image for ViT-Ti and Swin-T. On the
fast path (GAP -> Linear heads) it is the target layer's map (output_map), which the concepts step reads
(cam_store.kept_maps): ~100 KB per image for ResNet-18 at 224 px.

Which images: the errors first (the steps after the pass look at mistakes), then the correct ones, each group in
a seeded random order over the whole test set. The order is total and fixed before the pass, so the kept set is
the same whatever the batches, and the union of torchrun shards' kept sets, trimmed, is the single-process set.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from helpers.model.cam_store import KeptBatch, LayerObserver, stack_kept

# 256 MB: all 2,000 images of a 224 px ViT-Ti or Swin-T bench run (~150 KB each) save the errors, and a
# 20,000-image run holds the same 256 MB (its peak RSS must stay within 25% of the 2,000-image run's).
KEEP_BYTES = 256 << 20


def _nbytes(value: KeptBatch) -> int:
    return sum(t.numel() * t.element_size() for t in (value if isinstance(value, tuple) else (value,)))


def _cpu_row(batch: KeptBatch, r: int) -> KeptBatch:
    """Image r of a kept batch, copied to the CPU (the kept set may outgrow a GPU's spare memory) as float32: under
    autocast the pass computes float16 or bfloat16 values, which the float32 tail, the head weights and the
    concepts step would otherwise meet (as GalleryActivations and the features, kept as float32)."""
    def row(t: torch.Tensor) -> torch.Tensor:
        return t[r].detach().to("cpu", dtype=torch.float32 if t.is_floating_point() else t.dtype, copy=True)
    return tuple(row(t) for t in batch) if isinstance(batch, tuple) else row(batch)


class PassInputs(LayerObserver):
    """An inference-pass observer (`capture()` around the pass, `update()` after each batch) on `layer`,
    keeping `keep(inputs, output)` of each image while the budget allows."""

    def __init__(self, layer: torch.nn.Module, keep: Callable, n_images: int, seed: int = 0,
                 budget_bytes: int = KEEP_BYTES):
        super().__init__(layer, keep)
        self.budget_bytes = int(budget_bytes)
        self._order = np.random.default_rng(seed).permutation(int(n_images))   # lower is kept first
        self._values: dict[int, KeptBatch] = {}
        self._wrong: dict[int, bool] = {}
        self._row_bytes = 0

    def update(self, start: int, probs: np.ndarray, labels: np.ndarray, preds: np.ndarray) -> None:
        n = len(probs)
        batch = self._take(n)
        if batch is None:
            return
        wrong = np.asarray(labels) != np.asarray(preds)
        if not self._row_bytes:
            self._row_bytes = max(1, _nbytes(_cpu_row(batch, 0)))
        for r in self._chosen(start + np.arange(n), wrong):
            self._values[int(r)] = _cpu_row(batch, int(r) - start)
            self._wrong[int(r)] = bool(wrong[int(r) - start])
        self._trim()

    def _priority(self, rows: np.ndarray, wrong: np.ndarray) -> np.ndarray:
        """Sort keys: the errors before the correct images, then the seeded order."""
        return (~wrong).astype(np.int64) * len(self._order) + self._order[rows]

    def _chosen(self, rows: np.ndarray, wrong: np.ndarray) -> np.ndarray:
        """The rows of a new batch that would survive the trim (so a full budget copies nothing in vain)."""
        cap = self.capacity
        if len(self._values) + len(rows) <= cap:
            return rows
        held = np.fromiter(self._values, np.int64, len(self._values))
        held_wrong = np.array([self._wrong[int(i)] for i in held], dtype=bool)
        keys = np.concatenate([self._priority(held, held_wrong), self._priority(rows, wrong)])
        if len(keys) <= cap:
            return rows
        limit = np.partition(keys, cap - 1)[cap - 1] if cap else -1
        return rows[self._priority(rows, wrong) <= limit]

    def _trim(self) -> None:
        cap = self.capacity
        if len(self._values) <= cap:
            return
        held = np.fromiter(self._values, np.int64, len(self._values))
        keys = self._priority(held, np.array([self._wrong[int(i)] for i in held], dtype=bool))
        for i in held[np.argsort(keys, kind="stable")[cap:]]:
            del self._values[int(i)], self._wrong[int(i)]

    @property
    def capacity(self) -> int:
        """How many images the budget holds (all of them until the first batch says how big one is)."""
        return len(self._order) if not self._row_bytes else self.budget_bytes // self._row_bytes

    def __contains__(self, i: int) -> bool:
        return int(i) in self._values

    def __len__(self) -> int:
        return len(self._values)

    @property
    def nbytes(self) -> int:
        return len(self._values) * self._row_bytes

    def stack(self, indices: Sequence[int]) -> KeptBatch:
        """The kept values of `indices` as one batch, in the form they were kept (a tensor or a tuple)."""
        return stack_kept([self._values[int(i)] for i in indices])

    def kept_state(self) -> dict:
        """What this pass kept, for another process (a torchrun shard's images): global rows and CPU values."""
        rows = sorted(self._values)
        return {"rows": rows, "wrong": [self._wrong[i] for i in rows], "values": [self._values[i] for i in rows],
                "row_bytes": self._row_bytes}

    def merge_states(self, states) -> None:
        """Take in the kept_state() of the other shards' passes over disjoint images, then trim to the budget:
        exactly the set one process keeps (the order is global)."""
        for state in states:
            self._row_bytes = self._row_bytes or int(state["row_bytes"])
            for i, wrong, value in zip(state["rows"], state["wrong"], state["values"]):
                if int(i) in self._values:
                    raise ValueError("kept pass inputs overlap: the merged passes must cover disjoint images")
                self._values[int(i)], self._wrong[int(i)] = value, bool(wrong)
        self._trim()
