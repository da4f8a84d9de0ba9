"""Every confusion-matrix cell's images for index.html: the cell's errors, worst first, each with the CAM for
the true and for the predicted class, packed into JPEG sheets the page draws from when a cell is clicked."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from helpers.compute.cells import CellExamples, cell_examples
from helpers.model.pass_cams import PRED, TRUE
from helpers.plots.cell_tiles import MAX_SIDE, TileSheets, fit_thumbnails, thumb_side, tile_sheets
from helpers.steps.context import Run, Section

CAM_BATCH = 256   # CAMs asked of the store at a time: one progress-bar step, bounded memory
# The pixels of one panel summed over the shown images: 3,000 CIFAR-size (32x32) thumbnails, about 12 MB of
# sheets in index.html. Larger images get smaller thumbnails when many are shown, so that the page's size is
# bounded by this, not by the image size (3,000 images at 64 px made a 56 MB page), down to MIN_SIDE.
PANEL_PIXELS = 3000 * 32 * 32
MIN_SIDE = 24


@dataclass(kw_only=True)
class CellImages(Section):
    title: str = "Images behind each confusion-matrix cell"
    examples: CellExamples
    tiles: TileSheets
    p_pred: np.ndarray       # per shown image: confidence in the predicted class
    p_true: np.ndarray       # and the probability left on the true class


def cams_for(run: Run, idx: np.ndarray, *targets: np.ndarray) -> list[np.ndarray]:
    """The default engine's CAMs of images idx for each list of targets, through the store without holding them
    (drawn once, kept only as thumbnails): each image runs once for all its targets, from what the pass kept of it
    where it kept something (PassInputs)."""
    both = run.cams.get(np.tile(idx, len(targets)).tolist(), np.concatenate(targets).tolist(), keep=False)
    return list(both.reshape((len(targets), len(idx)) + both.shape[1:]))


def draw_tiles(run: Run, engine, idx: np.ndarray, t: np.ndarray, q: np.ndarray, side: tuple[int, int]) -> TileSheets:
    """The tiles of images idx: each image, its CAM for class t[i] and for class q[i], as thumbnails of `side`."""
    from tqdm.auto import tqdm

    thumbs: list[list[np.ndarray]] = [[], [], []]
    from_pass = kept_in_pass(run, engine, idx[:2], t[:2], q[:2])
    h, w = run.inputs.shape[-2:]
    with tqdm(total=len(idx), desc="Confusion-cell CAMs", unit="img", disable=not run.progress) as bar:
        for s in range(0, len(idx), CAM_BATCH):
            b = idx[s:s + CAM_BATCH]
            thumbs[0] += fit_thumbnails([run.data.images[i] for i in b], side)
            if from_pass:   # t, q are the labels and predictions: the two maps the pass kept
                maps = [run.pass_cams.maps(b, which, (h, w)) for which in (TRUE, PRED)]
            else:
                with run.model_threads():
                    maps = cams_for(run, b, t[s:s + CAM_BATCH], q[s:s + CAM_BATCH])
            for k, cams in enumerate(maps, 1):
                thumbs[k] += fit_thumbnails(run.overlays(b, cams), side)
            bar.update(len(b))
    return tile_sheets(*thumbs)


def kept_in_pass(run: Run, engine, idx: np.ndarray, t: np.ndarray, q: np.ndarray) -> bool:
    """Whether the inference pass's own Grad-CAMs (helpers.model.pass_cams) can give the cells' CAMs: the fast
    path for the store's default engine, with every image's maps kept, and verified against pytorch-grad-cam
    (computing two images' CAMs verifies it when nothing else has yet)."""
    pc = run.pass_cams
    if pc is None or not pc.complete or engine.method != "gradcam" or not engine.fast or not len(idx):
        return False
    if not engine.cam_path.verified:
        engine.compute(run.inputs[torch.as_tensor(idx)], t, progress=False)
    return engine.fast and engine.cam_path.verified


def tile_side(h: int, w: int, n_images: int) -> tuple[int, int]:
    """(width, height) of one thumbnail panel for n_images images of h x w: at most MAX_SIDE, and small enough
    that all of them together stay within PANEL_PIXELS (but never below MIN_SIDE on the longer side)."""
    fit = int((PANEL_PIXELS * max(h, w) ** 2 / (h * w * max(n_images, 1))) ** 0.5)   # long side, for that area
    return thumb_side(h, w, max(MIN_SIDE, min(MAX_SIDE, fit)))


def cell_images(run: Run) -> CellImages:
    """CELL_IMAGES images per non-empty off-diagonal cell (at most CELL_IMAGES_MAX in all), each with its true-
    and predicted-class CAMs (the run's CAM method and layer)."""
    pr, p = run.preds, run.params
    ex = cell_examples(pr.labels, pr.preds, pr.probs, p.CELL_IMAGES, p.CELL_IMAGES_MAX)
    idx = ex.shown
    t, q = pr.labels[idx], pr.preds[idx]
    side = tile_side(*run.data.images.shape[1:3], len(idx))
    tiles = tile_sheets([], [], [])
    if len(idx) and run.cams is not None:
        engine = run.cams.engine()

        def draw() -> list:
            t_ = draw_tiles(run, engine, idx, t, q, side)
            return [list(t_.side), t_.per_row, t_.per_sheet, t_.sheets]
        # an identical re-run takes the sheets from the cache: no CAM is computed again
        (w, h), per_row, per_sheet, sheets = run.cache.cached("cell_tiles", draw, engine.method, engine.layer_name,
                                                              idx, t, q, list(side))
        tiles = TileSheets(side=(int(w), int(h)), per_row=int(per_row), per_sheet=int(per_sheet), sheets=list(sheets))
    sec = CellImages(examples=ex, tiles=tiles, p_pred=pr.probs[idx, q].astype(np.float32) if len(idx) else
                     np.zeros(0, np.float32), p_true=pr.probs[idx, t].astype(np.float32) if len(idx) else
                     np.zeros(0, np.float32))
    if not len(tiles.sheets) and ex.n_cells:
        sec.notes.append("The confusion-matrix cells have no images in index.html: "
                         + ("CELL_IMAGES=0 or CELL_IMAGES_MAX=0 turns them off." if not (p.CELL_IMAGES and p.CELL_IMAGES_MAX)
                            else "this run has no CAMs."))
    elif ex.n_cells_without_images:
        sec.notes.append(f"{ex.n_cells_without_images} of {ex.n_cells} confused cells have no images in index.html "
                         f"(CELL_IMAGES_MAX={ex.budget} images were spent on the larger cells); raise CELL_IMAGES_MAX "
                         "to include them.")
    return sec
