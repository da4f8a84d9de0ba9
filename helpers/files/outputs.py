"""The run's output folder: the paths it hands out, saving through the background writer, one plotly.js,
the manifest, and the clean-up of what an earlier run wrote and this one did not.

Invariant: a path handed out by `Outputs.path` is an output of this run; at the end the manifest lists
exactly those, and only files an earlier manifest listed are ever deleted (never anything the suite did
not write).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

from helpers.errors import OutputError
from helpers.files import atomic
from helpers.files.background import BackgroundWriter

MANIFEST = ".manifest.json"
PLOTLY_JS = "plotly.min.js"


def check_writable(folder: Path) -> None:
    """Fail before any compute if the outputs cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OutputError(
            f"The output folder {folder.resolve()} is not writable ({exc.strerror or exc}). "
            "Set OUTPUT_DIR to a folder you can write to."
        ) from None


class Outputs:
    """Owns OUTPUT_DIR for one run: every output goes through `path` (so the manifest knows it), PNGs and
    figures through the background writer (encoded while the next step computes)."""

    def __init__(self, folder: str | os.PathLike):
        self.root = Path(folder)
        check_writable(self.root)
        self.written: set[Path] = set()
        self.writer = BackgroundWriter()
        # Gallery file -> digest of what was drawn into it; `before` holds an earlier run's [digest, size, mtime_ns].
        self.drawn: dict[str, str] = {}
        self.drawn_before: dict[str, list] = {}
        self.n_kept = 0

    def path(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        self.written.add(path.resolve())
        return path

    # ------------------------------------------------------------------ saving
    def save_figure(self, fig, *parts: str, dpi: int = 100, tight: Optional[bool] = None) -> Path:
        """A matplotlib figure (drawn by the writer's worker process) or a PIL image (encoded on its thread).
        tight=None: bbox_inches="tight" unless the figure has constrained layout, which already fits
        everything in ("tight" would cost a second full draw); tight=False for figures laid out by hand."""
        path = self.path(*parts)
        if hasattr(fig, "savefig"):
            import matplotlib.pyplot as plt
            if tight is None:
                engine = fig.get_layout_engine() if hasattr(fig, "get_layout_engine") else None
                tight = type(engine).__name__ != "ConstrainedLayoutEngine"
            self.writer.figure(fig, path, dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
            plt.close(fig)
        else:
            self.writer.image(fig, path)
        return path

    def save_rendered(self, render: Callable, args: tuple, *parts: str) -> Path:
        """Have the writer's worker process draw `render(*args)` (a PIL picture) and save it: for pictures
        that are saved but not shown, so this process goes on computing meanwhile."""
        path = self.path(*parts)
        self.writer.rendered(render, args, path)
        return path

    def save_csv(self, df, *parts: str) -> Path:
        return atomic.save_csv(df, self.path(*parts))

    def write_text(self, text: str, *parts: str) -> Path:
        return atomic.write_text(self.path(*parts), text)

    def ship_plotlyjs(self, *subdir: str) -> str:
        """Write plotly.js once per run at the top of the folder (rewritten only when it changed) and return its
        path relative to a page in `subdir`: every HTML output loads this one copy instead of 4.8 MB each."""
        path = self.root / PLOTLY_JS
        if path.resolve() not in self.written:
            from plotly.offline import get_plotlyjs
            data = get_plotlyjs().encode("utf-8")
            if not (path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data):
                atomic.write_bytes(path, data)
            self.path(PLOTLY_JS)
        return "../" * len(subdir) + PLOTLY_JS

    def flush(self) -> None:
        """Wait for the files being written in the background (the index and the manifest need them on disk)."""
        try:
            self.writer.flush()
        except Exception as exc:
            raise OutputError(f"Could not write an output file under {self.root.resolve()} ({exc}). "
                              "Check the free disk space and the folder's permissions.") from exc

    def close(self, raise_errors: bool = True) -> None:
        self.writer.close(raise_errors=raise_errors)

    # ------------------------------------------------------------------ kept drawings
    def unchanged(self, rel: str, digest: str, force: bool = False) -> bool:
        """True when `rel` is what an earlier run drew from content with this `digest` and has not been touched
        since (size and mtime as that run recorded them): a cached re-run then keeps the file instead of drawing
        it again. Records the digest either way."""
        self.drawn[rel] = digest
        before = self.drawn_before.get(rel)
        if not before or before[0] != digest or force:
            return False
        try:
            st = (self.root / rel).stat()
        except OSError:
            return False
        kept = [st.st_size, st.st_mtime_ns] == before[1:]
        self.n_kept += kept
        if kept:
            self.path(*Path(rel).parts)   # still this run's output (kept by the manifest)
        return kept

    def drawn_record(self) -> dict[str, list[Any]]:
        """{file: [digest, size, mtime_ns]} of what this run drew, for the next run's `unchanged`."""
        record = {}
        for rel, digest in self.drawn.items():
            try:
                st = (self.root / rel).stat()
            except OSError:
                continue
            record[rel] = [digest, st.st_size, st.st_mtime_ns]
        return record

    # ------------------------------------------------------------------ the manifest
    def files(self) -> list[str]:
        """This run's outputs, relative to the folder, sorted."""
        root = self.root.resolve()
        return sorted(str(p.relative_to(root)) for p in self.written)

    def remove_stale(self, also_current: tuple[str, ...] = ()) -> list[str]:
        """Delete the files an earlier run listed in its manifest that this run did not write (and the
        temporary files a killed run left). Nothing else is ever deleted."""
        atomic.remove_orphan_temps(self.root)
        try:
            previous = json.loads((self.root / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        root = self.root.resolve()
        current = set(self.files()) | set(also_current)
        removed = []
        for rel in previous:
            path = (root / rel).resolve()
            if rel in current or root not in path.parents:
                continue
            if path.is_file():
                path.unlink()
                removed.append(rel)
        return removed

    def write_manifest(self, files: list[str]) -> None:
        atomic.write_text(self.root / MANIFEST, json.dumps(sorted(files), indent=1))
