"""Which images each confusion-matrix cell shows in the report: for every non-empty off-diagonal cell, its
errors worst first (most confident in the wrong class), at most `per_cell` of them, within a total budget."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CellExamples:
    """Every non-empty off-diagonal cell (true, pred, count), biggest first; cell k shows the images
    shown[offsets[k]:offsets[k] + n_shown[k]], worst first. A cell past the budget shows none."""
    true: np.ndarray
    pred: np.ndarray
    count: np.ndarray
    offsets: np.ndarray
    n_shown: np.ndarray
    shown: np.ndarray        # image indices, cell after cell
    per_cell: int
    budget: int

    @property
    def n_cells(self) -> int:
        return len(self.true)

    @property
    def n_cells_without_images(self) -> int:
        return int((self.n_shown == 0).sum())

    def table(self) -> np.ndarray:
        """(n_cells, 5) int64: true, pred, count, offset, n_shown per cell."""
        return np.stack([self.true, self.pred, self.count, self.offsets, self.n_shown], axis=1).astype(np.int64)

    def images_of(self, true_cls: int, pred_cls: int) -> np.ndarray:
        k = np.flatnonzero((self.true == true_cls) & (self.pred == pred_cls))
        if not len(k):
            return np.zeros(0, np.int64)
        k = int(k[0])
        return self.shown[self.offsets[k]:self.offsets[k] + self.n_shown[k]]


def cell_examples(labels, preds, probs, per_cell: int, budget: int) -> CellExamples:
    """Cells ordered by count (desc), then true and predicted id; images inside a cell by the predicted
    class's probability (desc), then index. Cells take min(count, per_cell) images each, in that order, until
    `budget` images are taken; the cell that crosses the budget takes what is left."""
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    probs = np.asarray(probs)
    if labels.shape != preds.shape or probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"labels {labels.shape}, preds {preds.shape} and probs {probs.shape} do not match")
    if per_cell < 0 or budget < 0:
        raise ValueError("per_cell and budget must be >= 0")
    wrong = np.flatnonzero(labels != preds)
    t, p = labels[wrong], preds[wrong]
    p_pred = probs[wrong, p]
    # every error, grouped by cell, worst first inside its cell
    order = np.lexsort((wrong, -p_pred, p, t))
    wrong, t, p = wrong[order], t[order], p[order]
    new_cell = np.ones(len(t), dtype=bool)
    new_cell[1:] = (t[1:] != t[:-1]) | (p[1:] != p[:-1])
    starts = np.flatnonzero(new_cell)
    counts = np.diff(np.append(starts, len(t)))
    cell_t, cell_p = t[starts], p[starts]
    by_size = np.lexsort((cell_p, cell_t, -counts))
    starts, counts, cell_t, cell_p = starts[by_size], counts[by_size], cell_t[by_size], cell_p[by_size]
    want = np.minimum(counts, per_cell)
    taken = np.minimum(want, np.maximum(budget - (np.cumsum(want) - want), 0))
    offsets = np.cumsum(taken) - taken
    shown = (np.concatenate([wrong[s:s + n] for s, n in zip(starts, taken)]) if len(starts)
             else np.zeros(0, np.int64))
    return CellExamples(true=cell_t, pred=cell_p, count=counts.astype(np.int64), offsets=offsets.astype(np.int64),
                        n_shown=taken.astype(np.int64), shown=shown.astype(np.int64), per_cell=int(per_cell),
                        budget=int(budget))
