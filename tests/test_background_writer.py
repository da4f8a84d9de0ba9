"""background.BackgroundWriter: what the worker process writes equals what this process would write, figures
jump ahead of pictures in its queue, flush() takes over the jobs the worker has not started, and a dead worker
or an unpicklable job still ends in a written file."""
import subprocess
import sys
import threading
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image


from helpers.files import png
from helpers.files import background
from helpers.plots import gallery
from helpers.files.background import BackgroundWriter, _Feeder

matplotlib.use("Agg")
RNG = np.random.default_rng(0)


def _gallery_content():
    rows = [gallery.GalleryRow(image=RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8), title=f"row {i}",
                             panels=[("CAM → pred: tiger", RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8))],
                             ok=bool(i % 2)) for i in range(3)]
    return "Class 007: tiger — accuracy 42.0%", [("3 worst predictions", rows)]


def _figure():
    fig = Figure(figsize=(3, 2))
    ax = fig.add_subplot()
    ax.plot([0, 1, 2], [2, 0, 1])
    ax.set_title("a small figure")
    return fig


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_worker_output_equals_in_process_output(tmp_path):
    content = _gallery_content()
    writer = BackgroundWriter()
    writer.rendered(gallery.render_gallery, content, tmp_path / "gallery.png")
    writer.figure(_figure(), tmp_path / "figure.png")
    writer.image(gallery.render_gallery(*content), tmp_path / "here.png")
    assert writer._worker is not None and writer._worker.proc.poll() is None   # a live worker took the jobs
    for future, *_ in writer._jobs:   # let the worker finish them (close() would take over unstarted ones)
        future.result(timeout=60)
    writer.close()
    assert writer.done == {"worker": 2, "here": 0}
    assert np.array_equal(_pixels(tmp_path / "gallery.png"), np.asarray(gallery.render_gallery(*content)))
    assert np.array_equal(_pixels(tmp_path / "gallery.png"), _pixels(tmp_path / "here.png"))
    png.save_figure(_figure(), tmp_path / "figure_here.png")
    assert np.array_equal(_pixels(tmp_path / "figure.png"), _pixels(tmp_path / "figure_here.png"))
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*"))   # no temporary files left


def test_feeder_runs_lower_priority_numbers_first_then_in_order():
    started, release, ran = threading.Event(), threading.Event(), []

    def run(job):
        if job == b"first":
            started.set()
            release.wait(10)
        ran.append(job)

    feeder = _Feeder(run)
    futures = [feeder.submit(b"first", 1)]
    assert started.wait(10)   # the worker is busy with "first" while the rest queue up
    futures += [feeder.submit(job, prio) for job, prio in
                [(b"picture a", 1), (b"figure a", 0), (b"picture b", 1), (b"figure b", 0)]]
    assert futures[3].cancel()   # not started yet: flush() may take it over
    release.set()
    for f in futures[:3] + futures[4:]:
        f.result(timeout=10)
    feeder.shutdown()
    assert ran == [b"first", b"figure a", b"figure b", b"picture a"]


class _SlowWorker:
    """Stands in for the worker process: the first job blocks until released, and every job is recorded."""

    def __init__(self):
        self.started, self.release, self.ran = threading.Event(), threading.Event(), []

        class _Proc:
            @staticmethod
            def poll():
                return None

        self.proc = _Proc()

    def run(self, job):
        import pickle
        fn, args = pickle.loads(job)
        if not self.ran:
            self.started.set()
            self.release.wait(10)
        self.ran.append(str(args[-1] if fn is background.render_png else args[1]))
        fn(*args)

    def peak_rss_kb(self):
        return None

    def close(self):
        pass


def test_flush_takes_over_the_jobs_the_worker_has_not_started(tmp_path):
    writer = BackgroundWriter()
    worker = writer._worker = _SlowWorker()
    content = _gallery_content()
    paths = [tmp_path / f"g{i}.png" for i in range(4)]
    for p in paths:
        writer.rendered(gallery.render_gallery, content, p)
    writer.figure(_figure(), tmp_path / "fig.png")
    assert worker.started.wait(10)
    threading.Timer(0.5, worker.release.set).start()   # the running job finishes while flush() works
    writer.flush()
    # The worker finished the job it had started; flush() did the other four here (the figure would have run
    # next in the worker, so it was taken last).
    assert worker.ran == [str(paths[0])]
    assert writer.done == {"worker": 1, "here": 4}
    expected = np.asarray(gallery.render_gallery(*content))
    for p in paths:
        assert np.array_equal(_pixels(p), expected)
    assert (tmp_path / "fig.png").stat().st_size > 0
    writer.close()


def test_a_dead_worker_still_ends_in_written_files(tmp_path):
    writer = BackgroundWriter()
    writer.warm_up()
    writer._worker.proc.kill()
    writer._worker.proc.wait()
    content = _gallery_content()
    writer.rendered(gallery.render_gallery, content, tmp_path / "g.png")
    writer.figure(_figure(), tmp_path / "fig.png")
    writer.close()   # no error: the jobs were redone in this process
    assert writer.done == {"worker": 0, "here": 2}
    assert np.array_equal(_pixels(tmp_path / "g.png"), np.asarray(gallery.render_gallery(*content)))
    assert _pixels(tmp_path / "fig.png").shape[0] > 0
    # Later jobs do not wait on the dead worker any more.
    start = time.perf_counter()
    writer.rendered(gallery.render_gallery, content, tmp_path / "g2.png")
    writer.close()
    assert (tmp_path / "g2.png").exists() and time.perf_counter() - start < 30


def test_unpicklable_figure_is_saved_in_process(tmp_path):
    fig = _figure()
    fig.axes[0].xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"<{v:g}>"))
    writer = BackgroundWriter()
    writer.figure(fig, tmp_path / "lambda.png")
    writer.close()
    assert writer.done == {"worker": 0, "here": 0}   # never queued: written on the spot
    assert _pixels(tmp_path / "lambda.png").shape[0] > 0


def test_a_real_error_is_raised_by_flush(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    writer = BackgroundWriter()
    writer.rendered(gallery.render_gallery, _gallery_content(), tmp_path / "a_file" / "g.png")
    with pytest.raises(OSError):
        writer.flush()
    writer.close(raise_errors=False)


def test_jobs_still_queued_when_the_interpreter_exits_are_written(tmp_path):
    """A script that never calls flush() or close() still gets its files, as with a plain executor."""
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
import numpy as np
from matplotlib.figure import Figure

from helpers.files import atomic
from helpers.files import png
from helpers.files import background
from helpers.plots import gallery
rows = [gallery.GalleryRow(image=np.zeros((32, 32, 3), np.uint8), title="t", panels=[("CAM → pred: x",
        np.full((32, 32, 3), 200, np.uint8))], ok=True)]
writer = background.BackgroundWriter()
fig = Figure(figsize=(2, 2)); fig.add_subplot().plot([0, 1])
writer.figure(fig, {str(tmp_path / "fig.png")!r})
for i in range(6):
    writer.rendered(gallery.render_gallery, ("title", [("section", rows)]), {str(tmp_path)!r} + f"/g{{i}}.png")
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["fig.png"] + [f"g{i}.png" for i in range(6)]
    for name in names:
        assert _pixels(tmp_path / name).shape[0] > 0
