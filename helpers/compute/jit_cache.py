"""numba's on-disk cache for umap-learn's compiled kernels.

umap-learn declares its numba kernels without cache=True, so every new Python process compiles them again
before its first UMAP, even of a few hundred points: longer than the rest of the deep dive takes. Turning
numba's own cache on for them (Dispatcher.enable_caching, what cache=True does) makes every run after the
first load the compiled code from __pycache__ (numba falls back to a per-user cache folder when that is
read-only). Numba keys the cache by the source file, so an upgraded umap-learn is compiled afresh.
"""
from __future__ import annotations

import warnings

_enabled = False
UMAP_MODULES = ("umap.umap_", "umap.layouts", "umap.utils", "umap.spectral", "umap.distances", "umap.sparse")


def enable_umap_jit_cache() -> int:
    """Enable numba caching for umap-learn's not-yet-compiled kernels; returns how many. Safe to call
    repeatedly and without umap-learn or numba installed (then it does nothing)."""
    global _enabled
    if _enabled:
        return 0
    _enabled = True
    try:
        import importlib

        from numba.core.caching import NullCache
        from numba.core.dispatcher import Dispatcher
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # umap's "Tensorflow not installed" notice on import
            modules = [importlib.import_module(name) for name in UMAP_MODULES]
    except Exception:  # no umap/numba, or an incompatible numba: UMAP still works, only slower
        return 0
    count = 0
    for module in modules:
        for obj in vars(module).values():
            if isinstance(obj, Dispatcher) and isinstance(getattr(obj, "_cache", None), NullCache) \
                    and not obj.overloads:
                try:
                    obj.enable_caching()
                    count += 1
                except Exception:  # a kernel numba cannot cache (e.g. a closure) just compiles as before
                    continue
    return count
