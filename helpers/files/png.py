"""PNG encoding: one numpy filter pass and one deflate call (ISA-L when installed); PNG files, PNG data: URIs
and matplotlib figures saved atomically."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from helpers.files.atomic import atomic_path

# PNG zlib level for every PNG written: the fastest that compresses, for files a little larger than at Pillow's 6.
PNG_COMPRESS_LEVEL = 1
# Deflate levels 0-3 go through ISA-L (the `isal` package) when it is installed: much faster than zlib at these
# levels, and its output is a standard zlib stream; without it the standard library's zlib is used.
ISAL_MAX_LEVEL = 3
_FAST_PNG_MODES = ("L", "RGB", "RGBA")   # the modes png_bytes encodes; Pillow does any other
# data: URIs stay inside pages and notebooks, where their size lasts longer than the milliseconds of encoding.
DATA_URI_COMPRESS_LEVEL = 6


def save_figure(fig, path: str | os.PathLike, dpi: int = 100, **kwargs) -> Path:
    """Save a matplotlib figure atomically (format taken from the final suffix). PNGs go through matplotlib's
    own savefig, with Pillow at PNG_COMPRESS_LEVEL: a run saves only a few figures, in the figure worker
    process, so png_bytes would gain little there."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    if fmt == "png":
        kwargs.setdefault("pil_kwargs", {"compress_level": PNG_COMPRESS_LEVEL})
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=fmt, **kwargs)
    return path


def _deflate(data, level: int) -> bytes:
    """A zlib stream of `data`: ISA-L for levels 0-3 when `isal` is installed, else the standard library."""
    if level <= ISAL_MAX_LEVEL:
        try:
            from isal import isal_zlib
        except ImportError:
            pass
        else:
            return isal_zlib.compress(data, level)
    import zlib
    return zlib.compress(data, level)


def png_bytes(pixels, level: int = PNG_COMPRESS_LEVEL, dpi: Optional[float] = None) -> bytes:
    """A PNG file of 8-bit pixels: (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA; `dpi` is recorded in a
    pHYs chunk, as matplotlib records it.

    Every scanline gets PNG's "Up" filter (the difference to the row above, one numpy subtraction for the
    whole image), then one deflate call (_deflate). Pillow chooses a filter per row instead, which on the class
    galleries is slower and gives larger files. numpy, zlib and ISA-L release the GIL, so the writer thread
    leaves the main thread free meanwhile."""
    import struct
    import zlib

    import numpy as np
    a = np.ascontiguousarray(pixels)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"png_bytes needs uint8 (H, W), (H, W, 3) or (H, W, 4) pixels, got {a.dtype} {a.shape}")
    h, w = a.shape[:2]
    channels = 1 if a.ndim == 2 else a.shape[2]
    rows = a.reshape(h, w * channels)
    filtered = np.empty((h, w * channels + 1), np.uint8)
    filtered[:, 0] = 2                                     # filter type "Up"; the row above the first is zeros
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG wants

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    colour = {1: 0, 3: 2, 4: 6}[channels]
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
    if dpi:
        per_metre = int(round(dpi / 0.0254))
        header += chunk(b"pHYs", struct.pack(">IIB", per_metre, per_metre, 1))   # unit 1: metre
    return (b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", _deflate(filtered, level)) + chunk(b"IEND", b""))


def image_png_bytes(image, level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """A PIL image (or uint8 pixel array) as a PNG file: png_bytes for 8-bit grey, RGB and RGBA, Pillow for
    any other mode."""
    mode = getattr(image, "mode", None)
    if mode is None or mode in _FAST_PNG_MODES:
        import numpy as np
        return png_bytes(np.asarray(image), level=level)
    import io
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def save_png(image, path: str | os.PathLike) -> Path:
    """Save a PIL image (or uint8 pixel array) as PNG atomically (image_png_bytes). Fast zlib level, see
    PNG_COMPRESS_LEVEL."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(image_png_bytes(image))
    return path


def png_data_uri(image, level: int = DATA_URI_COMPRESS_LEVEL) -> str:
    """A PIL image (or uint8 pixel array) as a "data:image/png;base64,..." URI for an <img> in a page."""
    import base64
    return "data:image/png;base64," + base64.b64encode(image_png_bytes(image, level)).decode("ascii")
