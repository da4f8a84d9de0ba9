"""The run's output folder: the paths it hands out, saving through the background writer, one plotly.js,
the manifest, and the clean-up of what an earlier run wrote and this one did not.

Invariant: a path handed out by `Outputs.path` is an output of this run; at the end the manifest lists
exactly those, and only files an earlier manifest listed are ever deleted, and of those only regular files whose
names this suite writes (OUTPUT_PATTERNS), inside the folder and not through a link: never anything the suite did
not write. Nothing is written through a symlinked subfolder either.
"""
from __future__ import annotations

import errno
import fnmatch
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Optional

from helpers.errors import OutputError
from helpers.files import atomic, staging
from helpers.files.background import BackgroundWriter

MANIFEST = ".manifest.json"
PLOTLY_JS = "plotly.min.js"
PROBE = ".write-probe"   # the target name of check_writable's (uniquely named) probe files
# The folders of OUTPUT_DIR the suite writes into (compare/ by helpers.compare, .cache/ by RunCache).
SUBFOLDERS = ("worst_predictions", "deep_dive", "compare", ".cache")
RUN_SUBFOLDERS = ("worst_predictions", "deep_dive", ".cache")   # what an analysis run writes
# Every name the suite writes under OUTPUT_DIR, relative to it (the steps' outputs, README's DESCRIPTIONS).
# A manifest entry is deleted only when it matches one of these; temporary files only when their target does.
OUTPUT_PATTERNS = (
    "confusion_matrix_full.png", "confusion_matrix_top.png", "confusion_matrix_groups.png", "per_class_accuracy.csv",
    "per_class_accuracy_interactive.html",
    "confusion_matrix_interactive.html", PLOTLY_JS, "most_confused_pairs.csv", "top_confused_pairs.png",
    "confused_pair_*.png", "analysis_summary.txt", "recommendations.txt", "index.html",
    "worst_predictions/class_*.png",
    "deep_dive/group_confusion.png", "deep_dive/group_confusion.csv", "deep_dive/group_pair_*.png",
    "deep_dive/group_embedding.html", "deep_dive/group_embedding.png", "deep_dive/head_cosine_similarity.png",
    "deep_dive/occlusion_vs_cam.png", "deep_dive/superclass_confusion.png", "deep_dive/within_superclass_pairs.csv",
    "deep_dive/reliability_diagram.png", "deep_dive/reliability_bins.csv", "deep_dive/overconfident_classes.csv",
    "deep_dive/label_suspects.png", "deep_dive/label_suspects.csv", "deep_dive/label_errors.csv",
    "deep_dive/property_slices.csv", "deep_dive/property_slices.png", "deep_dive/train_neighbours_*.png",
    "deep_dive/near_duplicates.csv", "deep_dive/near_duplicates.png", "deep_dive/diagnosis.csv",
    "deep_dive/failure_modes.csv", "deep_dive/failure_modes_*.png", "deep_dive/cam_trust.csv",
    "deep_dive/cam_trust.png", "deep_dive/concepts.png", "deep_dive/concept_margins.csv",
    "deep_dive/method_comparison.png", "deep_dive/method_comparison.csv",
    "compare/compare_summary.txt", "compare/per_class_accuracy_delta.csv", "compare/pair_changes.csv",
    "compare/fixed_and_broken.csv", "compare/per_class_accuracy_delta.png", "compare/pair_changes.png",
    "compare/fixed_examples.png", "compare/broken_examples.png", "compare/index.html",
)
# Files the suite writes that are never outputs (so never deleted as stale), but whose temporaries are its own.
INTERNAL_PATTERNS = (MANIFEST, PROBE, "*/" + PROBE, ".cache/*.npz")


def is_output_name(rel: str) -> bool:
    """True when `rel` (a relative POSIX path) is a name this suite writes as an output."""
    return _matches(rel, OUTPUT_PATTERNS)


def _matches(rel: str, patterns: Iterable[str]) -> bool:
    """fnmatch part by part, so that a * never spans folders."""
    parts = rel.split("/")
    return any(len(p.split("/")) == len(parts) and all(map(fnmatch.fnmatchcase, parts, p.split("/")))
               for p in patterns)


def _is_own_temp_target(folder: str) -> Callable[[str], bool]:
    """For a subfolder ("" for the top): whether a temporary file's target is a name the suite writes there."""
    def ok(name: str) -> bool:
        rel = f"{folder}/{name}" if folder else name
        return is_output_name(rel) or _matches(rel, INTERNAL_PATTERNS)
    return ok


def _refuse_link_or_file(sub: Path) -> None:
    if sub.is_symlink():
        raise OutputError(f"{sub} is a symbolic link (to {os.path.realpath(sub)}). The suite does not write through "
                          "links, so that nothing outside the output folder is changed: remove or rename the link, "
                          "or set OUTPUT_DIR to another folder.")
    if sub.exists() and not sub.is_dir():
        raise OutputError(f"{sub} is a file where the suite writes a folder of outputs: remove or rename it, "
                          "or set OUTPUT_DIR to another folder.")


def _probe(folder: Path) -> None:
    atomic.new_temp(folder / PROBE).unlink()


def check_writable(folder: Path, subfolders: Iterable[str] = ()) -> None:
    """Fail before any compute if the outputs cannot be written: `folder` (created if missing) and each of
    `subfolders` that exists are probed with a uniquely named file; a subfolder that is a file or a symbolic
    link is refused (the suite never writes through links)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _probe(folder)
    except OSError as exc:
        fix = "" if exc.errno in (errno.EACCES, errno.EPERM) else " " + atomic.fix_for(folder / PROBE, exc)
        raise OutputError(
            f"The output folder {folder.resolve()} is not writable ({exc.strerror or exc}).{fix} "
            "Set OUTPUT_DIR to a folder you can write to."
        ) from None
    for name in subfolders:
        sub = folder / name
        _refuse_link_or_file(sub)
        if sub.is_dir():
            try:
                _probe(sub)
            except OSError as exc:
                raise OutputError(
                    f"The output subfolder {sub.resolve()} is not writable ({exc.strerror or exc}). Fix its "
                    "permissions, remove or rename it, or set OUTPUT_DIR to a folder you can write to."
                ) from None


def manifest_entries(data: Any) -> tuple[list[str], list[str]]:
    """(entries that may be deleted, warnings) for a parsed manifest: a JSON list of strings, each a normal
    relative path to a name this suite writes; anything else is not deleted (and said so)."""
    if not isinstance(data, list) or not all(isinstance(rel, str) for rel in data):
        shown = json.dumps(data)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return [], [f"{MANIFEST} is not a list of file names (it holds {shown}): it was ignored, "
                    "no earlier output was removed."]
    ok, skipped = [], []
    for rel in data:
        pure = PurePosixPath(rel)
        normal = (rel and "\\" not in rel and "\0" not in rel and not pure.is_absolute() and pure.as_posix() == rel
                  and not any(part in ("", ".", "..") for part in pure.parts))
        (ok if normal and is_output_name(rel) else skipped).append(rel)
    warnings = []
    if skipped:
        warnings.append(f"{MANIFEST} lists {len(skipped)} name(s) this suite does not write "
                        f"({', '.join(map(repr, skipped[:5]))}{' ...' if len(skipped) > 5 else ''}): left alone.")
    return ok, warnings


class Outputs:
    """Owns OUTPUT_DIR for one run: every output goes through `path` (so the manifest knows it), PNGs and
    figures through the background writer (encoded while the next step computes)."""

    def __init__(self, folder: str | os.PathLike):
        self.root = Path(folder)
        check_writable(self.root, RUN_SUBFOLDERS)
        self.real_root = self.root.resolve()
        self.written: set[Path] = set()
        self.writer = BackgroundWriter()
        # Gallery file -> digest of what was drawn into it; `before` holds an earlier run's [digest, size, mtime_ns].
        self.drawn: dict[str, str] = {}
        self.drawn_before: dict[str, list] = {}
        self.n_kept = 0
        self.kept: set[str] = set()     # outputs an earlier run wrote that this one keeps as they are
        self.warnings: list[str] = []   # what the clean-up did or left alone, and why (a malformed manifest, ...)
        self.warnings += staging.recover(self.root, self._remove_output, self.write_manifest)
        self.stage = staging.new_stage(self.root)   # everything is written here until commit()
        staging.ACTIVE[self.stage.name] = self

    def path(self, *parts: str) -> Path:
        """Where to write an output of this run (in the staging folder until commit()), recorded as this run's.
        Refused (OutputError) when it would leave the folder: an absolute or ".." part, or a subfolder that is
        a symbolic link."""
        rel = self._checked(*parts)
        self.written.add(self.real_root.joinpath(*rel.parts))
        return self.stage.joinpath(*rel.parts)

    def current(self, rel: str) -> Path:
        """Where this run's output `rel` is now: in the staging folder until commit(), or in the folder itself
        when the run kept an earlier run's copy unchanged."""
        staged = self.stage.joinpath(*self._checked(*rel.split("/")).parts)
        return staged if staged.exists() or rel not in self.kept else self.root.joinpath(*rel.split("/"))

    def _keep(self, rel: str) -> None:
        """An earlier run's output that this run keeps unchanged: listed as this run's, not moved."""
        self.written.add(self.real_root.joinpath(*self._checked(*rel.split("/")).parts))
        self.kept.add(rel)

    def _checked(self, *parts: str) -> PurePosixPath:
        rel = PurePosixPath(*parts) if parts else PurePosixPath()
        if not parts or rel.is_absolute() or any(p in ("", ".", "..") for p in rel.parts):
            raise OutputError(f"Refusing to write {'/'.join(parts)!r}: outputs are named relative to "
                              f"{self.root} and stay inside it.")
        path = self.root.joinpath(*rel.parts)
        for parent in list(path.parents)[:len(rel.parts) - 1]:
            _refuse_link_or_file(parent)
        real = path.parent.resolve()
        if real != self.real_root.joinpath(*rel.parts[:-1]):
            raise OutputError(f"Refusing to write {path}: its folder resolves to {real}, not inside the output folder "
                              f"{self.real_root}. Remove or rename the link, or set OUTPUT_DIR to another folder.")
        return rel

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
        return atomic.save_csv(df, self.path(*parts))   # an OSError is raised as an OutputError naming the fix

    def write_text(self, text: str, *parts: str) -> Path:
        return atomic.write_text(self.path(*parts), text)

    def ship_plotlyjs(self, *subdir: str) -> str:
        """Write plotly.js once per run at the top of the folder (rewritten only when it changed) and return its
        path relative to a page in `subdir`: every HTML output loads this one copy instead of 4.8 MB each."""
        path = self.root / PLOTLY_JS
        if self.real_root / PLOTLY_JS not in self.written:
            from plotly.offline import get_plotlyjs
            data = get_plotlyjs().encode("utf-8")
            try:
                same = path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data
            except OSError:   # unreadable: write it again (an error there names the fix)
                same = False
            if same:
                self._keep(PLOTLY_JS)
            else:
                atomic.write_bytes(self.path(PLOTLY_JS), data)
        return "../" * len(subdir) + PLOTLY_JS

    def flush(self) -> None:
        """Wait for the files being written in the background (the index and the manifest need them on disk)."""
        try:
            self.writer.flush()
        except OutputError:
            raise
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
            self._keep(rel)   # still this run's output (kept by the manifest)
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
        return sorted(p.relative_to(self.real_root).as_posix() for p in self.written)

    def remove_orphan_temps(self) -> list[Path]:
        """The temporary files killed runs of this suite left in the folders it writes (never elsewhere)."""
        removed = atomic.remove_orphan_temps(self.root, _is_own_temp_target(""))
        for sub in SUBFOLDERS:
            removed += atomic.remove_orphan_temps(self.root / sub, _is_own_temp_target(sub))
        return removed

    def stale_outputs(self, also_current: tuple[str, ...] = ()) -> list[str]:
        """The files an earlier run listed in its manifest that this run does not write. Only names this suite
        writes count; a malformed manifest is ignored (see `warnings`)."""
        try:
            previous = json.loads((self.root / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError, RecursionError) as exc:
            self.warnings.append(f"{MANIFEST} could not be read ({type(exc).__name__}): it was ignored, "
                                 "no earlier output was removed.")
            return []
        entries, warnings = manifest_entries(previous)
        self.warnings += warnings
        current = set(self.files()) | set(also_current)
        return [rel for rel in entries if rel not in current]

    def _remove_output(self, rel: str) -> bool:
        """Delete one earlier output: only a regular file inside the folder, not reached through a link."""
        if not is_output_name(rel):
            return False
        path = self.real_root.joinpath(*rel.split("/"))
        try:
            if path.resolve() != path or path.is_symlink() or not path.is_file():
                return False   # through a link, or not a plain file: not something this suite wrote there
            path.unlink()
        except OSError:
            return False
        return True

    def remove_stale(self, also_current: tuple[str, ...] = ()) -> list[str]:
        """Delete the stale outputs (and the temporary files a killed run left) now; commit() does this too."""
        self.remove_orphan_temps()
        return [rel for rel in self.stale_outputs(also_current) if self._remove_output(rel)]

    def commit(self) -> list[str]:
        """Move this run's outputs from the staging folder into OUTPUT_DIR, remove the earlier run's outputs
        this one does not write, and write the manifest (journalled: see files/staging.py). Returns the stale
        outputs removed."""
        self.remove_orphan_temps()
        stale = [rel for rel in self.stale_outputs() if (self.real_root / rel).is_file()]
        files = self.files()
        move = [rel for rel in files if rel not in self.kept]
        for rel in move:   # a subfolder turned into a link or a file, a folder in a file's place: refused, nothing moved
            self._checked(*rel.split("/"))
            dst = self.real_root.joinpath(*rel.split("/"))
            if dst.is_dir() and not dst.is_symlink():
                raise atomic.write_error(dst, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(dst)))
        try:
            staging.commit(self.root, self.stage, move, stale, files, self._remove_output, self.write_manifest)
        except OutputError:
            raise
        except OSError as exc:
            raise atomic.write_error(Path(exc.filename or self.root), exc) from exc
        staging.ACTIVE.pop(self.stage.name, None)
        return [rel for rel in stale if not (self.real_root / rel).exists()]

    def abandon(self) -> None:
        """A failed run: its staged outputs are discarded, the folder keeps the previous complete run."""
        staging.ACTIVE.pop(self.stage.name, None)
        staging.discard(self.stage)

    def write_manifest(self, files: list[str]) -> None:
        atomic.write_text(self.root / MANIFEST, json.dumps(sorted(files), indent=1))
