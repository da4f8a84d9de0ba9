"""Fonts for class names in any script: which installed fonts have the glyphs, and what to draw when none has.

Galleries (PIL) pick one font per text; matplotlib figures get a family list it falls back along per glyph.
A character no installed font has is written as its code point, "[U+6953]": visible, never a silent box.
"""
from __future__ import annotations

import functools
import unicodedata
from typing import Callable

from matplotlib import font_manager

PRIMARY_FAMILY = "DejaVu Sans"   # matplotlib's own default, always installed with it
# Installed fonts tried, in this order, for text DejaVu Sans has no glyphs for (class names in other scripts).
FALLBACK_FAMILIES = ("Noto Sans", "Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK KR",
                     "Noto Sans Arabic", "Noto Sans Hebrew", "Noto Sans Devanagari", "Noto Sans Thai",
                     "Noto Sans Bengali", "Noto Sans Tamil", "Source Han Sans", "Droid Sans Fallback",
                     "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Arial Unicode MS", "Liberation Sans", "FreeSans")
# Fonts never used as a fallback: matplotlib's Last Resort draws a box for every character (tofu by design), and
# the TeX/STIX math fonts map letters to symbols.
_NOT_FALLBACKS = ("last resort", "stix", "cm", "dejavu math")


@functools.lru_cache(maxsize=None)
def glyphs(path: str) -> frozenset:
    """Code points the font file has glyphs for (its cmap, read with fontTools); empty when unreadable."""
    try:
        from fontTools.ttLib import TTFont
        with TTFont(path, fontNumber=0, lazy=True) as f:
            return frozenset(f.getBestCmap() or {})
    except Exception:   # a font fontTools cannot read is simply never chosen
        return frozenset()


@functools.lru_cache(maxsize=2)
def fallback_files(bold: bool) -> tuple[str, ...]:
    """Font files to try after DejaVu Sans: FALLBACK_FAMILIES that are installed, then every other installed
    font except _NOT_FALLBACKS."""
    files = []
    for family in FALLBACK_FAMILIES:
        try:
            props = font_manager.FontProperties(family=family, weight="bold" if bold else "normal")
            files.append(font_manager.findfont(props, fallback_to_default=False))
        except ValueError:   # not installed
            pass
    files += [f.fname for f in font_manager.fontManager.ttflist
              if not f.name.lower().startswith(_NOT_FALLBACKS) and f.fname.lower().endswith((".ttf", ".otf", ".ttc"))]
    return tuple(dict.fromkeys(files))


def drawn(ch: str) -> bool:
    """Whether `ch` needs a glyph (spaces, control and format characters do not; private-use and unassigned
    code points do, and are shown as their code point)."""
    return not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf")


@functools.lru_cache(maxsize=1)
def fallback_families() -> tuple[str, ...]:
    """PRIMARY_FAMILY, then the installed FALLBACK_FAMILIES: matplotlib's font.family list, along which it falls
    back per glyph."""
    installed = {f.name for f in font_manager.fontManager.ttflist}
    return (PRIMARY_FAMILY,) + tuple(f for f in FALLBACK_FAMILIES if f in installed)


@functools.lru_cache(maxsize=1)
def _family_glyphs() -> frozenset:
    """Every code point some font of fallback_families() has."""
    have: set = set()
    for family in fallback_families():
        try:
            have |= glyphs(font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False))
        except ValueError:
            continue
    return frozenset(have)


def visible_text(text: str) -> str:
    """`text` with each character that no font of fallback_families() has written as its code point."""
    have = _family_glyphs()
    if not have or all(ord(c) in have or not drawn(c) for c in text):
        return text
    return "".join(c if not drawn(c) or ord(c) in have else f"[U+{ord(c):04X}]" for c in text)


def with_fallback_fonts(draw: Callable) -> Callable:
    """For figure functions: the figure is built with fallback_families() (its texts keep them when pickled to the
    figure worker), and every text no installed font can draw shows code points instead of boxes."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        import matplotlib
        from matplotlib.text import Text
        with matplotlib.rc_context({"font.family": list(fallback_families())}):
            fig = draw(*args, **kwargs)
        for artist in fig.findobj(Text):
            shown = visible_text(artist.get_text())
            if shown != artist.get_text():
                artist.set_text(shown)
        return fig
    return wrapper
