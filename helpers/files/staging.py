"""One run, one folder: a run writes into a staging folder inside OUTPUT_DIR and its outputs are moved into place
only when it completes, so a failed, interrupted or killed run leaves the previous complete results as they were.

The move is journalled: `.gradcam-commit.json` lists what moves in, what goes (the previous run's outputs this one
did not write) and the new manifest. The old index.html goes first and the new one comes last, so index.html never
describes files another run wrote; a run killed during the move is completed by the next one (`recover`), and a
staging folder whose run died is discarded by it. Either way the next run says so.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import weakref
from pathlib import Path
from typing import Callable

from helpers.files import atomic

STAGE_PREFIX = ".gradcam-run-"
STAGE_NAME = re.compile(rf"^{re.escape(STAGE_PREFIX)}(?P<host>[0-9a-f]{{8}})_(?P<pid>\d+)_[0-9a-f]{{8}}$")
JOURNAL = ".gradcam-commit.json"
# The stages of this process's runs still going, by name (a notebook kernel runs several; a run whose Outputs
# object is gone, e.g. after an error in a cell, no longer holds its stage).
ACTIVE: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()


def new_stage(root: Path) -> Path:
    """This process's staging folder (not created yet): the host and pid say whose it is."""
    return root / f"{STAGE_PREFIX}{atomic.HOST}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


def _is_stage(path: Path) -> bool:
    return bool(STAGE_NAME.match(path.name)) and path.is_dir() and not path.is_symlink()


def _owner_gone(path: Path) -> bool:
    match = STAGE_NAME.match(path.name)
    if match["host"] == atomic.HOST and int(match["pid"]) == os.getpid():
        return path.name not in ACTIVE   # an earlier run of this very process that failed
    return match["host"] != atomic.HOST or not atomic.process_alive(int(match["pid"]))


def apply_journal(root: Path, journal: dict, remove: Callable[[str], bool], write_manifest: Callable[[list], None]) -> None:
    """Carry out a commit: the old index out, the staged files in (index.html last), the stale ones removed
    (`remove(rel)`, which deletes only what this suite wrote), the manifest, then the journal and the stage go.
    Every step can be repeated, so a commit interrupted anywhere is completed by running it again."""
    stage = root / journal["stage"]
    moves = sorted(journal["move"], key=lambda rel: rel == "index.html")
    if "index.html" in moves and (stage / "index.html").is_file():
        (root / "index.html").unlink(missing_ok=True)
    for rel in moves:
        src, dst = stage.joinpath(*rel.split("/")), root.joinpath(*rel.split("/"))
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    for rel in journal["remove"]:
        remove(rel)
    write_manifest(journal["manifest"])
    (root / JOURNAL).unlink(missing_ok=True)
    discard(stage)


def discard(stage: Path) -> None:
    if _is_stage(stage):
        shutil.rmtree(stage, ignore_errors=True)


def commit(root: Path, stage: Path, move: list[str], stale: list[str], manifest: list[str],
           remove: Callable[[str], bool], write_manifest: Callable[[list], None]) -> None:
    journal = {"stage": stage.name, "move": sorted(move), "remove": sorted(stale), "manifest": sorted(manifest)}
    atomic.write_text(root / JOURNAL, json.dumps(journal, indent=1))
    apply_journal(root, journal, remove, write_manifest)


def recover(root: Path, remove: Callable[[str], bool], write_manifest: Callable[[list], None]) -> list[str]:
    """Before a run: complete a commit a killed run left half done, and discard the staging folders of runs
    that died before their commit. Returns what was done, in words, for the run's notes."""
    notes = []
    journal_path = root / JOURNAL
    if journal_path.is_file():
        try:
            journal = json.loads(journal_path.read_text(encoding="utf-8"))
            valid = (isinstance(journal, dict) and isinstance(journal.get("stage"), str)
                     and STAGE_NAME.match(journal["stage"])
                     and all(isinstance(journal.get(k), list) and all(isinstance(r, str) for r in journal[k])
                             for k in ("move", "remove", "manifest")))
        except (OSError, ValueError, RecursionError):
            valid = False
        if valid and _owner_gone(root / journal["stage"]):
            apply_journal(root, journal, remove, write_manifest)
            notes.append("An earlier run was stopped while its results were being moved into place; the move was "
                         "completed, so the folder holds that run's complete results.")
        elif not valid:
            journal_path.unlink(missing_ok=True)
            notes.append(f"{JOURNAL} was damaged and was removed; no output was moved or deleted because of it.")
    for stage in sorted(p for p in root.glob(STAGE_PREFIX + "*") if _is_stage(p)):
        if _owner_gone(stage) and not (journal_path.is_file() and stage.name in journal_path.read_text()):
            discard(stage)
            notes.append(f"An earlier run stopped before it finished ({stage.name}); its partial outputs were "
                         "discarded and the folder still holds the previous complete results.")
    return notes
