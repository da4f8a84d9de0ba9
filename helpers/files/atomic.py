"""Atomic file writes: write to a temporary file in the same folder, then rename.
An interrupted run leaves either the previous complete file or the new one, never half."""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically.
    fsync=True also flushes the data to disk before the rename (for caches that a later run trusts)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if fsync:
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# ".<final name>.<random>.tmp<final suffix>", as mkstemp names them in atomic_path.
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp(\.[A-Za-z0-9]+)?$")


def remove_orphan_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed run left under `folder` (they are never complete outputs)."""
    removed = []
    for path in Path(folder).rglob(".*.tmp*"):
        if path.is_file() and TEMP_NAME.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def save_csv(df, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)
