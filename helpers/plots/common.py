"""What more than one plots/ module needs: colormaps, the uint8 RGB form of an image, class colours, column checks
and the inputs of the embedding plots (drawn both as a matplotlib figure and as a Plotly page)."""
from __future__ import annotations

from typing import Callable, Sequence

import matplotlib
import numpy as np

from helpers.errors import ConfigError


def colormap(name: str):
    # matplotlib.cm.get_cmap was removed in matplotlib 3.9; the registry is the supported way.
    return matplotlib.colormaps[name]


def class_colours(n: int) -> list:
    """n distinct colours: tab10, tab20, or evenly spaced turbo for more classes."""
    if n <= 10:
        return [colormap("tab10")(i) for i in range(n)]
    if n <= 20:
        return [colormap("tab20")(i) for i in range(n)]
    return [colormap("turbo")(x) for x in np.linspace(0.05, 0.95, n)]


def name_lookup(names: Sequence[str], class_ids: Sequence[int]) -> Callable[[int], str]:
    """id -> display name. `names` is either every class's name indexed by id, or one name per
    entry of class_ids."""
    names = list(names)
    ids = [int(c) for c in class_ids]
    if all(0 <= c < len(names) for c in ids):
        return lambda i: names[i] if 0 <= i < len(names) else f"class {i}"
    if len(names) == len(ids):
        table = dict(zip(ids, names))
        return lambda i: table.get(i, f"class {i}")
    raise ValueError("names must list every class (indexed by id) or one name per entry of class_ids")


def embedding_inputs(coords, labels, preds, class_ids):
    """(coords, labels, preds, class ids to colour) checked and as arrays; ids first in class_ids order."""
    coords = np.asarray(coords, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(labels) or len(labels) != len(preds):
        raise ValueError(f"coords must be (N,2) with N labels and preds, got {coords.shape}, "
                         f"{labels.shape}, {preds.shape}")
    ids = list(dict.fromkeys(int(c) for c in class_ids))
    ids += [c for c in dict.fromkeys(labels.tolist()) if c not in ids]  # classes not listed still show
    return coords, labels, preds, ids



def require_columns(df, columns: Sequence[str], what: str) -> None:
    """Raise ConfigError naming the columns of `columns` that the table `what` lacks."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ConfigError(f"{what} is missing the column(s) {missing}; it has {list(df.columns)}")
