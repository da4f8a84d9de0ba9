"""The background writer: PNGs encoded on a thread, matplotlib figures and galleries drawn by a worker process."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Optional

from helpers.files.png import save_figure, save_png

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
    """`python -m helpers.files.background`: the writer's worker. Reads length-prefixed pickled jobs (a module-level
    function and its arguments, e.g. save_pickled_figure) on stdin and answers b"ok" or the error on the
    original stdout. It exits quietly, without a traceback, when its parent goes away (end of its input, a broken
    pipe) or on SIGINT (a Ctrl-C in the terminal, a Jupyter kernel interrupt or restart): its parent redoes
    whatever was left undone."""
    try:
        _serve_jobs_until_done()
    except (BrokenPipeError, EOFError, KeyboardInterrupt, ConnectionResetError) as exc:
        code = 130 if isinstance(exc, KeyboardInterrupt) else 0
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)   # not sys.exit: flushing the dead pipe again at shutdown would print a traceback


def _serve_jobs_until_done() -> None:
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
    """One `python -m helpers.files.background` subprocess (a plain subprocess rather than multiprocessing, whose
    spawn would re-run an unguarded user script in the child)."""

    def __init__(self):
        import subprocess
        package_parent = str(Path(__file__).resolve().parents[2])   # the folder holding helpers/
        env = dict(os.environ, MPLBACKEND="Agg",
                   PYTHONPATH=os.pathsep.join([package_parent] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        self.proc = subprocess.Popen([sys.executable, "-m", "helpers.files.background"], stdin=subprocess.PIPE,
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
    the GIL, and sending a figure costs a small fraction of rendering it.
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
