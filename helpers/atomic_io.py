"""Atomic file writes: write to a temporary file in the same folder, then rename.
An interrupted run leaves either the previous complete file or the new one, never half."""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional


# PNG zlib level for every PNG written: level 1 encodes ~3.5x faster than Pillow's default 6 for
# ~15% larger files (measured on the 460x1006 class galleries: 23 ms vs 79 ms each).
PNG_COMPRESS_LEVEL = 1
# Deflate levels 0-3 go through ISA-L (the `isal` package) when it is installed: on the class galleries
# level 1 takes 2.6 ms instead of zlib's 12.5 ms, for a slightly smaller file. Its output is a standard
# zlib stream; without it the standard library's zlib is used.
ISAL_MAX_LEVEL = 3
_FAST_PNG_MODES = ("L", "RGB", "RGBA")   # the modes png_bytes encodes; Pillow does any other


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


def save_figure(fig, path: str | os.PathLike, dpi: int = 100, **kwargs) -> Path:
    """Save a matplotlib figure atomically (format taken from the final suffix); PNGs are drawn by Agg and
    encoded by png_bytes (helpers.png_canvas)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    if fmt == "png":
        from .png_canvas import PNG_BACKEND
        kwargs.setdefault("backend", PNG_BACKEND)
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
    whole image), then one deflate call (_deflate). Pillow chooses a filter per row instead: on the 460x1006
    class galleries this encodes in less than half its time (20 vs 45 ms at zlib level 1) for files ~10%
    smaller. numpy, zlib and ISA-L release the GIL, so the writer thread leaves the main thread free meanwhile."""
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


def save_png(image, path: str | os.PathLike) -> Path:
    """Save a PIL image (or uint8 pixel array) as PNG atomically: png_bytes for 8-bit grey, RGB and RGBA,
    Pillow for any other mode. Fast zlib level, see PNG_COMPRESS_LEVEL."""
    path = Path(path)
    mode = getattr(image, "mode", None)
    with atomic_path(path) as tmp:
        if mode is None or mode in _FAST_PNG_MODES:
            import numpy as np
            tmp.write_bytes(png_bytes(np.asarray(image)))
        else:
            image.save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return path


def save_csv(df, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


# ----------------------------------------------------------------------------- background writing

def save_pickled_figure(data: bytes, path: str, dpi: int, kwargs: dict) -> str:
    """Unpickle a matplotlib figure and save it atomically (the figure worker's job)."""
    import pickle
    fig = pickle.loads(data)
    save_figure(fig, path, dpi=dpi, **kwargs)
    return path


def render_png(render, args: tuple, path: str) -> str:
    """Draw a PIL image with `render(*args)` and save it as PNG atomically (the figure worker's job for
    galleries: drawing them holds the GIL)."""
    save_png(render(*args), path)
    return path


def _serve_jobs() -> None:
    """`python -m helpers.atomic_io`: the writer's worker. Reads length-prefixed pickled jobs (a module-level
    function and its arguments, e.g. save_pickled_figure) on stdin and answers b"ok" or the error on the
    original stdout."""
    import pickle
    import struct
    reply_to = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)              # anything a library prints goes to stderr, not into the replies
    sys.stdout = sys.stderr
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.figure  # noqa: F401  (imported before the first job arrives)
    jobs = sys.stdin.buffer
    while True:
        head = jobs.read(8)
        if len(head) < 8:
            return
        job = jobs.read(struct.unpack("<Q", head)[0])
        try:
            fn, args = pickle.loads(job)
            fn(*args)
            reply = b"ok"
        except Exception as exc:  # reported to the parent, which retries in-process and raises there
            reply = f"{type(exc).__name__}: {exc}".encode()
        reply_to.write(struct.pack("<Q", len(reply)) + reply)
        reply_to.flush()


class _FigureWorker:
    """One `python -m helpers.atomic_io` subprocess (a plain subprocess rather than multiprocessing, whose
    spawn would re-run an unguarded user script in the child)."""

    def __init__(self):
        import subprocess
        package_parent = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, MPLBACKEND="Agg",
                   PYTHONPATH=os.pathsep.join([package_parent] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        self.proc = subprocess.Popen([sys.executable, "-m", "helpers.atomic_io"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)

    def run(self, job: bytes) -> None:
        import struct
        self.proc.stdin.write(struct.pack("<Q", len(job)) + job)
        self.proc.stdin.flush()
        head = self.proc.stdout.read(8)
        if len(head) < 8:
            raise BrokenPipeError("the figure worker exited")
        reply = self.proc.stdout.read(struct.unpack("<Q", head)[0])
        if reply != b"ok":
            raise OSError(reply.decode(errors="replace"))

    def peak_rss_kb(self) -> Optional[int]:
        """The worker's peak resident memory (VmHWM, Linux), while it is still running."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as fh:
                return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
        except (OSError, StopIteration, ValueError):
            return None

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()


class _Feeder:
    """Hands jobs to the worker process one at a time, lowest priority number first, then in the order they
    came. One ThreadPoolExecutor thread takes the best queued job for every job submitted, so jobs still queued
    when the interpreter exits are done first, as with a plain executor."""

    def __init__(self, run: Callable[[bytes], None]):
        import itertools
        import threading
        from concurrent.futures import ThreadPoolExecutor
        self._run, self._heap, self._order = run, [], itertools.count()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-feeder")

    def submit(self, job: bytes, priority: int):
        import heapq
        from concurrent.futures import Future
        future = Future()
        with self._lock:
            heapq.heappush(self._heap, (priority, next(self._order), future, job))
        self._pool.submit(self._run_next)
        return future

    def _run_next(self) -> None:
        import heapq
        while True:
            with self._lock:
                if not self._heap:
                    return
                _, _, future, job = heapq.heappop(self._heap)
            if future.set_running_or_notify_cancel():   # False: cancelled, flush() did it itself
                break
        try:
            future.set_result(self._run(job))
        except BaseException as exc:
            future.set_exception(exc)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class BackgroundWriter:
    """Writes PNG outputs while the caller goes on computing.

    PIL images go to a writer thread (png_bytes: numpy and zlib release the GIL while they encode). matplotlib
    figures, and PIL pictures still to be drawn (`rendered`), go pickled to one worker process: drawing holds
    the GIL, and sending a figure costs ~40 ms where rendering the 100-class confusion matrix costs ~1 s.
    Figures go ahead of pictures in the worker's queue: galleries are many small jobs that fill its idle time.
    Every file is still written atomically. If the worker cannot start, dies, or a job cannot be pickled, it is
    done in this process instead. `flush()` does the jobs the worker has not reached yet itself (from the back
    of its queue), waits for the rest, and raises the first error."""

    FIGURE, PICTURE = 0, 1   # worker queue priorities

    def __init__(self, processes: bool = True):
        self._use_processes = processes
        self._images = None    # thread writing PIL images
        self._feeder: Optional[_Feeder] = None   # thread feeding the worker process
        self._worker: Optional[_FigureWorker] = None
        self._jobs: list = []  # (future, fallback or None, priority, order)
        self.worker_peak_rss_kb = 0   # largest figure-worker peak memory seen (Linux), for the benchmark
        self.done = {"worker": 0, "here": 0}   # worker jobs by where they ended up being done

    def warm_up(self) -> None:
        """Start the worker now, so it imports matplotlib in parallel with the caller's work."""
        if self._use_processes and self._worker is None:
            try:
                self._worker = _FigureWorker()
            except Exception:  # no subprocesses here: save in this process
                self._use_processes = False

    def image(self, image, path: str | os.PathLike) -> None:
        if self._images is None:
            from concurrent.futures import ThreadPoolExecutor
            self._images = ThreadPoolExecutor(max_workers=1, thread_name_prefix="png-writer")
        self._jobs.append((self._images.submit(save_png, image, path), None, -1, len(self._jobs)))

    def figure(self, fig, path: str | os.PathLike, dpi: int = 100, **kwargs) -> None:
        import pickle
        self.warm_up()
        args = None
        if self._worker is not None:
            try:
                args = (pickle.dumps(fig), str(path), dpi, kwargs)
            except Exception:   # e.g. a lambda formatter: render here
                args = None
        if args is None or not self._submit(save_pickled_figure, args, self.FIGURE,
                                            lambda: save_pickled_figure(*args)):
            save_figure(fig, path, dpi=dpi, **kwargs)

    def rendered(self, render, args: tuple, path: str | os.PathLike) -> None:
        """Save `render(*args)` (a module-level function returning a PIL image) as PNG at `path`, drawn by the
        worker process (without one, it is drawn here and encoded on the writer thread)."""
        self.warm_up()
        here = lambda: self.image(render(*args), path)  # noqa: E731
        if self._worker is None or not self._submit(render_png, (render, args, str(path)), self.PICTURE, here):
            here()

    def _submit(self, fn, args: tuple, priority: int, fallback: Callable[[], None]) -> bool:
        """Queue fn(*args) for the worker, with `fallback` to do the same here. False if args cannot be pickled."""
        import pickle
        try:
            job = pickle.dumps((fn, args))
        except Exception:
            return False
        if self._feeder is None:
            self._feeder = _Feeder(self._worker.run)
        self._jobs.append((self._feeder.submit(job, priority), fallback, priority, len(self._jobs)))
        return True

    def flush(self) -> None:
        first = None
        while self._jobs:   # a fallback may queue a PNG for the writer thread: wait for that too
            jobs, self._jobs = self._jobs, []
            first = self._finish(jobs) or first
        if first is not None:
            raise first

    def _finish(self, jobs: list) -> Optional[BaseException]:
        first = None
        # Rather than wait idle, do the jobs the worker has not started yet here, from the back of its queue
        # (last priority, latest first), while the worker goes on from the front (a started job cannot be
        # cancelled).
        stolen = {}
        for future, fallback, _, _ in sorted(jobs, key=lambda j: (j[2], j[3]), reverse=True):
            if fallback is not None and future.cancel():
                try:
                    fallback()
                    stolen[id(future)] = None
                except Exception as exc:
                    stolen[id(future)] = exc
        for future, fallback, _, _ in jobs:
            if id(future) in stolen:
                self.done["here"] += 1
                first = first or stolen[id(future)]
                continue
            error = future.exception()
            if fallback is not None:
                self.done["worker" if error is None else "here"] += 1
            if error is not None and fallback is not None:
                if isinstance(error, BrokenPipeError) or (self._worker and self._worker.proc.poll() is not None):
                    self._drop_worker()
                try:   # the worker failed or died: write it here, where a real error surfaces plainly
                    fallback()
                    error = None
                except Exception as exc:
                    error = exc
            first = first or error
        return first

    def _drop_worker(self) -> None:
        if self._worker is not None:
            self._worker.close()
        self._worker, self._use_processes = None, False

    def close(self, raise_errors: bool = True) -> None:
        """Write what is queued and stop the thread(s) and the worker process."""
        try:
            self.flush()
        except Exception:
            if raise_errors:
                raise
        finally:
            if self._images is not None:
                self._images.shutdown(wait=True)
            if self._feeder is not None:
                self._feeder.shutdown()
            self._images = self._feeder = None
            if self._worker is not None:
                self.worker_peak_rss_kb = max(self.worker_peak_rss_kb, self._worker.peak_rss_kb() or 0)
                self._worker.close()
                self._worker = None


if __name__ == "__main__":
    _serve_jobs()
