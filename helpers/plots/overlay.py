"""CAMs drawn over their images, and the one reading of an image's pixel values that every figure shares.

The pixel convention (`to_rgb01`, `to_rgb_uint8`): uint8 images are 0..255; any other image is 0..1 unless
its values exceed 1, in which case it is 0..255. Grey images (H, W) or (H, W, 1) are repeated to RGB.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from helpers.errors import ConfigError


def _rgb_stack(images: np.ndarray, allow_alpha: bool) -> tuple[np.ndarray, np.ndarray]:
    """(images as (N, H, W, 3) in their own dtype, per-image full-scale value: 255.0 or 1.0)."""
    img = images[..., None] if images.ndim == 3 else images
    channels = (1, 3, 4) if allow_alpha else (1, 3)
    if img.ndim != 4 or img.shape[3] not in channels:
        raise ConfigError(f"expected an image (H, W) or (H, W, C) with C in {channels}; got {img.shape[1:]}.")
    if img.shape[3] == 1:
        img = np.repeat(img, 3, axis=3)
    img = img[..., :3]
    if img.dtype == np.uint8:
        return img, np.full(len(img), 255.0, np.float32)
    scale = np.where(img.reshape(len(img), -1).max(axis=1, initial=0) > 1, 255.0, 1.0).astype(np.float32)
    return img, scale


def to_rgb01(images: np.ndarray) -> np.ndarray:
    """A stack of images (N, H, W[, 1 or 3]) as float32 RGB in [0, 1], the input show_cam_on_image wants."""
    img, scale = _rgb_stack(np.asarray(images), allow_alpha=False)
    return img.astype(np.float32) / scale[:, None, None, None]


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """One image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) as contiguous uint8 RGB (H, W, 3), for drawing:
    alpha is dropped, NaN becomes 0 and values outside the scale are clipped."""
    img, scale = _rgb_stack(np.asarray(image)[None], allow_alpha=True)
    img, scale = img[0], float(scale[0])
    if img.dtype != np.uint8:
        img = np.clip(np.nan_to_num(img.astype(np.float64) * (255.0 / scale)), 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(img)


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
    # Imported here: pytorch_grad_cam imports torch (seconds), which the figure worker never needs.
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = to_rgb01(np.asarray(image)[None])[0]
    _check_image_weight(image_weight)
    return show_cam_on_image(rgb, _cam_mask(cam, *rgb.shape[:2]), use_rgb=True, image_weight=float(image_weight))


def overlay_many(images: Sequence[np.ndarray], cams: Sequence[np.ndarray], image_weight: float = 0.5) -> np.ndarray:
    """`overlay` of every (image, CAM) pair, in one vectorised pass: uint8 (N, H, W, 3).

    The same operations as show_cam_on_image, per pixel and in float32, so each result is bit-identical to
    `overlay(images[i], cams[i])`. A gallery page needs ~13 overlays of small images, where the library call's
    per-call overhead outweighs the work itself. Images must share one shape."""
    if len(images) != len(cams):
        raise ConfigError(f"overlay_many needs one CAM per image; got {len(images)} images and {len(cams)} CAMs.")
    if not len(images):
        return np.zeros((0, 0, 0, 3), np.uint8)
    _check_image_weight(image_weight)
    rgb = to_rgb01(np.stack([np.asarray(i) for i in images]))
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
