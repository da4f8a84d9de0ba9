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


# Pictures embedded in index.html: JPEG at this quality is 3-10x smaller than PNG for photos and CAM overlays,
# and the page links each to its full-quality PNG.
JPEG_QUALITY = 85


def jpeg_data_uri(image, quality: int = JPEG_QUALITY, full_colour: bool = False) -> str:
    """A PIL image (or uint8 RGB/grey pixel array) as a "data:image/jpeg;base64,..." URI (alpha dropped).
    full_colour: no chroma subsampling (4:4:4), for thumbnails only a few pixels wide, where 4:2:0 smears
    a CAM's colours across its edges."""
    import base64
    import io

    from PIL import Image
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    # no optimize=True: Pillow then fails on large sheets written to memory ("broken data stream")
    img.save(buf, format="JPEG", quality=int(quality), subsampling=0 if full_colour else 2)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# Figures shown inline in a notebook are saved with it on every autosave: at most this wide (a notebook column at
# 100% zoom shows less), as the smaller of JPEG and PNG. The files under OUTPUT_DIR keep full quality.
INLINE_MAX_WIDTH = 1000
INLINE_JPEG_QUALITY = 80


def inline_image(fig, max_width: int = INLINE_MAX_WIDTH) -> tuple[bytes, str]:
    """(encoded bytes, "jpeg" or "png") of a matplotlib figure or PIL image for showing in a notebook, at most
    max_width px wide. JPEG wins for photos and CAM overlays, PNG for flat line art with few colours."""
    import io

    from PIL import Image
    if hasattr(fig, "savefig"):
        buf = io.BytesIO()
        engine = fig.get_layout_engine() if hasattr(fig, "get_layout_engine") else None
        tight = {} if type(engine).__name__ == "ConstrainedLayoutEngine" else {"bbox_inches": "tight"}
        fig.savefig(buf, format="png", dpi=min(100.0, max_width / fig.get_figwidth()), **tight)
        buf.seek(0)
        img = Image.open(buf)
        img.load()
    else:
        img = fig if isinstance(fig, Image.Image) else Image.fromarray(fig)
    if img.mode != "RGB":
        img = img.convert("RGBA")
        flat = Image.new("RGB", img.size, (255, 255, 255))   # transparency on white, as notebooks show it
        flat.paste(img, mask=img.getchannel("A"))
        img = flat
    if img.width > max_width:
        img = img.resize((max_width, max(1, round(img.height * max_width / img.width))), Image.LANCZOS)
    png = image_png_bytes(img, DATA_URI_COMPRESS_LEVEL)
    jpeg = io.BytesIO()
    img.save(jpeg, format="JPEG", quality=INLINE_JPEG_QUALITY, optimize=True)
    return (jpeg.getvalue(), "jpeg") if len(jpeg.getvalue()) < len(png) else (png, "png")


def preview_data_uri(path, max_width: int = 900) -> str:
    """A saved picture as a compact JPEG data: URI for a page (shrunk to max_width, transparency flattened onto
    white), or "" when it cannot be read."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            img = im.convert("RGBA") if im.mode in ("P", "LA", "RGBA") else im.convert("RGB")
    except OSError:
        return ""
    if img.mode == "RGBA":   # JPEG has no alpha
        flat = Image.new("RGB", img.size, "white")
        flat.paste(img, mask=img.getchannel("A"))
        img = flat
    if img.width > max_width:
        img = img.resize((max_width, max(1, round(img.height * max_width / img.width))), Image.LANCZOS)
    return jpeg_data_uri(img, quality=80)
