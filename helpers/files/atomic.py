"""Atomic file writes: write to a temporary file in the same folder, then rename.
An interrupted run leaves either the previous complete file or the new one, never half.

The suite's temporary files carry a mark no other program writes: ".<final name>.gradcam_<host>_<pid>_<random>
.tmp<final suffix>", so the clean-up after a killed run (`remove_orphan_temps`) can prove a leftover is its own
and that the process which wrote it is gone. Outputs get the usual mode for the user's umask (0644 under 022),
not mkstemp's 0600. Every OS failure while writing is an OutputWriteError (an OutputError that is still an
OSError) naming the file, the OS's reason and the fix.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from helpers.errors import OutputError

# Which host wrote a temporary file: a process id means something only on the machine that gave it out.
HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
TEMP_MARK = "gradcam"
# ".<final name>.gradcam_<host>_<pid>_<random>.tmp<final suffix>", as atomic_path names them (mkstemp's random
# part is 8 characters of [a-z0-9_]).
TEMP_NAME = re.compile(rf"^\.(?P<target>.+)\.{TEMP_MARK}_(?P<host>[0-9a-f]{{8}})_(?P<pid>[0-9]+)_[a-z0-9_]{{8}}"
                       r"\.tmp(?P<suffix>\.[^.]+)?$")
# A temporary file of another host is swept only when this old (no write takes a day; its pid cannot be checked).
FOREIGN_TEMP_AGE_S = 24 * 3600


class OutputWriteError(OutputError, OSError):
    """An OS failure writing an output (full disk, permissions, a file in the way of a folder): the suite's
    OutputError, with a message naming the fix, and still an OSError (errno, strerror, filename of the failure)
    for code that handles those."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _umask_at_import() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask_at_import()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (/proc), else as it was at import."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK


def _blocking_file(path: Path) -> Optional[Path]:
    """The first part of `path`'s folders that exists but is not a folder (a file where a folder must go)."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
        if parent.is_symlink() and not parent.exists():
            return parent   # a dangling link
    return None


def fix_for(path: Path, exc: OSError) -> str:
    """What to do about an OS failure writing `path`, by its errno."""
    code, folder = exc.errno, path.parent
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return (f"The disk holding {folder} is full: free disk space there (or set OUTPUT_DIR to a folder on "
                "another disk) and run again.")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"Check the permissions of {folder} (you need to be able to create files there), "
                "or set OUTPUT_DIR to a folder you can write to.")
    if code in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR) or isinstance(exc, (FileExistsError, NotADirectoryError)):
        blocker = path if code == errno.EISDIR or path.is_dir() else (_blocking_file(path) or path)
        kind = "a folder" if blocker.is_dir() else "a file"
        return (f"{blocker} is {kind} in the way of an output the suite writes: remove or rename it, "
                "or set OUTPUT_DIR to another folder.")
    if code == errno.ENAMETOOLONG:
        return "The file name is too long for this file system: set OUTPUT_DIR to a shorter folder path."
    return "Check the free disk space and the folder's permissions, or set OUTPUT_DIR to another folder."


STAGE_PART = re.compile(r"^\.gradcam-run-[0-9a-f]{8}_\d+_[0-9a-f]{8}$")   # files/staging.py's staging folders


def final_path(path: str | os.PathLike) -> Path:
    """Where a staged output goes (the staging folder left out of the path): what messages name."""
    return Path(*[part for part in Path(path).parts if not STAGE_PART.match(part)])


def write_error(path: str | os.PathLike, exc: OSError, what: str = "the output file") -> OutputWriteError:
    """An OutputWriteError for an OS failure writing `path`: the file, the OS's reason and the fix."""
    path = final_path(path)
    err = OutputWriteError(f"Could not write {what} {path} ({exc.strerror or exc}). {fix_for(path, exc)}")
    err.errno, err.strerror, err.filename = exc.errno, exc.strerror, str(path)
    return err


def new_temp(path: Path) -> Path:
    """Create an empty temporary file next to `path`, named with the suite's mark, with the mode for the umask."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{TEMP_MARK}_{HOST}_{os.getpid()}_",
                               suffix=".tmp" + path.suffix, dir=path.parent)
    try:
        mode = 0o666 & ~current_umask()
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        else:
            os.chmod(tmp, mode)
    finally:
        os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically.
    fsync=True also flushes the data to disk before the rename (for caches that a later run trusts).
    An OSError on the way (creating the folder, writing, renaming) is raised as an OutputWriteError."""
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = new_temp(path)
        yield tmp_path
        if fsync:
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OutputError:
        raise
    except OSError as exc:
        raise write_error(path, exc) from exc
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (any doubt counts as alive)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True   # os.kill(pid, 0) would terminate it on Windows: rely on the age rule instead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True   # e.g. EPERM: someone else's live process
    try:   # a zombie (killed, not yet reaped) is gone too
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_orphan_temp(path: Path, target_ok: Callable[[str], bool] = lambda name: True) -> bool:
    """True for a temporary file this suite wrote (its mark, a target `target_ok` accepts) whose process is gone."""
    match = TEMP_NAME.match(path.name)
    if not match or not target_ok(match["target"]):
        return False
    if match["suffix"] and not match["target"].endswith(match["suffix"]):
        return False
    try:
        if path.is_symlink() or not path.is_file():
            return False
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False
    if match["host"] != HOST or os.name != "posix":
        return age > FOREIGN_TEMP_AGE_S
    return not process_alive(int(match["pid"]))


def remove_orphan_temps(folder: str | os.PathLike,
                        target_ok: Callable[[str], bool] = lambda name: True) -> list[Path]:
    """Delete the temporary files a killed run of this suite left in `folder` itself (not its subfolders): only
    names with the suite's mark whose target `target_ok` accepts and whose process is no longer running, so
    other programs' temporary files and a concurrent run's files in flight are never touched."""
    folder = Path(folder)
    removed = []
    try:
        if folder.is_symlink() or not folder.is_dir():
            return removed
        candidates = list(folder.glob(f".*.{TEMP_MARK}_*.tmp*"))
    except OSError:
        return removed
    for path in candidates:
        if is_orphan_temp(path, target_ok):
            try:
                path.unlink()
            except OSError:
                continue
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
