"""The suite never deletes or changes what it did not write, and every OS failure while writing is an
OutputError that names the folder and the fix.

Like tests/test_errors.py, the failures are one table: each row sets up a case and returns the user's action, the
message fragments and an optional check; the test asserts the error type, the fragments, and that nothing outside
OUTPUT_DIR changed. Then the clean-up (orphan temporaries, the manifest), the output mode and the figure worker's
quiet exit. README's Troubleshooting section lists these cases.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from helpers.errors import OutputError, SuiteError
from helpers.files import atomic, background
from helpers.files.cache import RunCache
from helpers.files.outputs import MANIFEST, OUTPUT_PATTERNS, Outputs, check_writable, is_output_name
from helpers.pipeline import Analysis

from conftest import REPO, run_params

LIMIT = 100
# Other programs' temporary files, as editors and office suites name them: never the suite's to delete.
USER_TEMPS = (".settings.json.a1B2c3.tmp", ".thesis.docx.k9_x.tmp.docx", ".index.html.Xy12_z.tmp.html",
              ".class_000_apple.png.k1ll3d.tmp.png")


@dataclass
class Ctx:
    tmp: Path
    cifar_root: Path
    ckpt: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def user(self) -> Path:
        """A folder of the user's, beside OUTPUT_DIR."""
        return self.tmp / "user"

    def params(self, **kw):
        return run_params(self.cifar_root, self.ckpt, self.out, **{"EMBEDDING": "tsne", "LIMIT": LIMIT, **kw})

    def outputs(self) -> Outputs:
        return Outputs(self.out)


def snapshot(root: Path, skip: Path) -> dict[str, object]:
    """Every file, folder and link under `root` outside `skip`: content, mode and link target."""
    state = {}
    for path in sorted(root.rglob("*")):
        if path == skip or skip in path.parents:
            continue
        st = path.lstat()
        if path.is_symlink():
            state[str(path)] = ("link", os.readlink(path))
        elif path.is_dir():
            state[str(path)] = ("dir", st.st_mode)
        else:
            state[str(path)] = ("file", st.st_mode, path.read_bytes())
    return state


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def suite_temp(folder: Path, target: str, pid: int, host: str = atomic.HOST, rand: str = "abcd1234") -> Path:
    """A temporary file named as atomic_path names them."""
    suffix = Path(target).suffix
    return folder / f".{target}.{atomic.TEMP_MARK}_{host}_{pid}_{rand}.tmp{suffix}"


def no_temps(out: Path) -> Callable[[], None]:
    def check():
        left = [p for p in out.rglob("*") if atomic.TEMP_NAME.match(p.name)]
        assert not left, f"temporary files left: {left}"
    return check


def _figure() -> Figure:
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    return fig


def _picture() -> Image.Image:
    return Image.fromarray(np.full((8, 8, 3), 100, np.uint8))


def fail_with(ctx: Ctx, owner, name: str, code: int, only_under: Optional[Path] = None) -> None:
    """Make owner.name raise OSError(code) (for paths under `only_under` when its first argument is a path)."""
    original = getattr(owner, name)

    def failing(*args, **kwargs):
        target = next((a for a in args if isinstance(a, (str, Path))), None)
        if only_under is None or (target is not None and Path(only_under) in Path(target).parents):
            raise OSError(code, os.strerror(code), str(target))
        return original(*args, **kwargs)
    ctx.monkeypatch.setattr(owner, name, failing)


def _same_text(path: Path, text: str) -> None:
    assert path.read_text() == text


def in_process_figures(ctx: Ctx) -> None:
    """No figure worker: matplotlib figures are saved in this process, where monkeypatches apply."""
    def no_worker():
        raise OSError("no subprocesses here")
    ctx.monkeypatch.setattr(background, "_FigureWorker", no_worker)


# ------------------------------------------------------------------------------------------------ the table
@dataclass
class Case:
    id: str
    setup: Callable[[Ctx], tuple[Callable[[], object], list[str], Optional[Callable[[], None]]]]


CASES: list[Case] = []


def case(id: str):
    def register(setup):
        CASES.append(Case(id, setup))
        return setup
    return register


DISK_FULL = ["No space left on device", "is full: free disk space there", "set OUTPUT_DIR"]


@case("disk-full-write-text")
def _(ctx):
    out = ctx.outputs()
    (ctx.out / "analysis_summary.txt").write_text("the earlier summary")   # an earlier run's file
    fail_with(ctx, Path, "write_text", errno.ENOSPC, only_under=ctx.out)

    def unchanged():
        assert (ctx.out / "analysis_summary.txt").read_text() == "the earlier summary"
        no_temps(ctx.out)()
    return lambda: out.write_text("new", "analysis_summary.txt"), \
        [f"Could not write the output file {ctx.out / 'analysis_summary.txt'}", str(ctx.out), *DISK_FULL], unchanged


@case("disk-full-save-csv")
def _(ctx):
    out = ctx.outputs()
    fail_with(ctx, pd.DataFrame, "to_csv", errno.ENOSPC)
    return lambda: out.save_csv(pd.DataFrame({"a": [1]}), "deep_dive", "reliability_bins.csv"), \
        [str(ctx.out / "deep_dive" / "reliability_bins.csv"), *DISK_FULL], no_temps(ctx.out)


@case("disk-full-save-figure")
def _(ctx):
    in_process_figures(ctx)
    out = ctx.outputs()
    fail_with(ctx, Figure, "savefig", errno.ENOSPC)
    return lambda: (out.save_figure(_figure(), "top_confused_pairs.png"), out.flush()), \
        [str(ctx.out / "top_confused_pairs.png"), *DISK_FULL], no_temps(ctx.out)


@case("disk-full-gallery-png")
def _(ctx):
    out = ctx.outputs()
    fail_with(ctx, Path, "write_bytes", errno.ENOSPC, only_under=ctx.out)
    return lambda: (out.save_figure(_picture(), "worst_predictions", "class_000_apple.png"), out.flush()), \
        [str(ctx.out / "worst_predictions" / "class_000_apple.png"), *DISK_FULL], no_temps(ctx.out)


@case("permission-denied-while-writing")
def _(ctx):
    out = ctx.outputs()
    fail_with(ctx, atomic.os, "replace", errno.EACCES)
    return lambda: out.write_text("x", "recommendations.txt"), \
        [str(ctx.out / "recommendations.txt"), "Permission denied", f"Check the permissions of {ctx.out}",
         "set OUTPUT_DIR to a folder you can write to"], no_temps(ctx.out)


def _subfolder_is_a_file(name: str):
    def setup(ctx):
        ctx.out.mkdir()
        (ctx.out / name).write_text("the user's notes")
        # A missing checkpoint too: OutputError rather than CheckpointError proves the check runs first.
        params = ctx.params(MODEL_PATH=str(ctx.tmp / "missing.pt"))

        def kept():
            assert (ctx.out / name).read_text() == "the user's notes"
            assert not list(ctx.out.rglob("*.png")) and not list(ctx.out.rglob("*.csv"))
        return lambda: Analysis(params, progress=False).run_all(), \
            [f"{ctx.out / name} is a file where the suite writes a folder", "remove or rename it",
             "set OUTPUT_DIR to another folder"], kept
    return setup


for _name in ("worst_predictions", "deep_dive", ".cache"):
    case(f"subfolder-{_name}-is-a-file")(_subfolder_is_a_file(_name))


@case("subfolder-becomes-a-file-before-the-write")
def _(ctx):
    out = ctx.outputs()
    (ctx.out / "deep_dive").write_text("the user's notes")
    return lambda: out.save_csv(pd.DataFrame({"a": [1]}), "deep_dive", "label_suspects.csv"), \
        [f"{ctx.out / 'deep_dive'} is a file", "remove or rename it", "set OUTPUT_DIR"], \
        lambda: _same_text(ctx.out / "deep_dive", "the user's notes")


@case("folder-of-a-direct-write-is-a-file")   # helpers.compare writes with atomic.* directly
def _(ctx):
    (ctx.tmp / "compare").write_text("the user's notes")
    return lambda: atomic.write_text(ctx.tmp / "compare" / "index.html", "<html>"), \
        [f"{ctx.tmp / 'compare'} is a file in the way", "remove or rename it", "set OUTPUT_DIR"], None


@case("output-name-taken-by-a-folder")
def _(ctx):
    out = ctx.outputs()
    (ctx.out / "recommendations.txt").mkdir()
    return lambda: (out.write_text("x", "recommendations.txt"), out.commit()), \
        [f"{ctx.out / 'recommendations.txt'} is a folder in the way", "remove or rename it"], no_temps(ctx.out)


def _symlinked_subfolder(name: str):
    def setup(ctx):
        elsewhere = ctx.user / "elsewhere"
        elsewhere.mkdir(parents=True)
        (elsewhere / "class_000_apple.png").write_bytes(b"the user's picture")
        ctx.out.mkdir()
        (ctx.out / name).symlink_to(elsewhere, target_is_directory=True)
        params = ctx.params(MODEL_PATH=str(ctx.tmp / "missing.pt"))
        return lambda: Analysis(params, progress=False).run_all(), \
            [f"{ctx.out / name} is a symbolic link", str(elsewhere), "does not write through links",
             "remove or rename the link", "set OUTPUT_DIR to another folder"], None
    return setup


for _name in ("worst_predictions", "deep_dive", ".cache"):
    case(f"subfolder-{_name}-is-a-symlink")(_symlinked_subfolder(_name))


@case("subfolder-becomes-a-symlink-before-the-write")
def _(ctx):
    out = ctx.outputs()
    elsewhere = ctx.user / "elsewhere"
    elsewhere.mkdir(parents=True)
    (ctx.out / "worst_predictions").symlink_to(elsewhere, target_is_directory=True)

    def nothing_written():
        out.close(raise_errors=False)
        assert not list(elsewhere.iterdir())
    return lambda: (out.save_figure(_picture(), "worst_predictions", "class_000_apple.png"), out.flush()), \
        [f"{ctx.out / 'worst_predictions'} is a symbolic link", "remove or rename the link", "set OUTPUT_DIR"], \
        nothing_written


@case("compare-subfolder-is-a-symlink")   # helpers.compare checks OUTPUT_DIR/compare like this before writing
def _(ctx):
    ctx.out.mkdir()
    (ctx.user / "elsewhere").mkdir()
    (ctx.out / "compare").symlink_to(ctx.user / "elsewhere", target_is_directory=True)
    return lambda: check_writable(ctx.out, ["compare"]), \
        [f"{ctx.out / 'compare'} is a symbolic link", "remove or rename the link", "set OUTPUT_DIR"], None


@case("disk-full-before-any-compute")
def _(ctx):
    fail_with(ctx, atomic.tempfile, "mkstemp", errno.ENOSPC)
    params = ctx.params(MODEL_PATH=str(ctx.tmp / "missing.pt"))
    return lambda: Analysis(params, progress=False), \
        [f"The output folder {ctx.out} is not writable (No space left on device)", "free disk space",
         "Set OUTPUT_DIR"], None


@case("output-name-leaving-the-folder")
def _(ctx):
    out = ctx.outputs()
    return lambda: out.write_text("x", "..", "user", "notes.txt"), \
        ["Refusing to write '../user/notes.txt'", "stay inside it"], None


@pytest.fixture
def ctx(tmp_path, cifar_root, tiny_checkpoint, monkeypatch) -> Ctx:
    c = Ctx(tmp=tmp_path, cifar_root=cifar_root, ckpt=tiny_checkpoint, monkeypatch=monkeypatch)
    c.user.mkdir()
    (c.user / "thesis.docx").write_bytes(b"the user's thesis")
    for name in USER_TEMPS:
        (c.user / name).write_bytes(b"the user's temporary file")
    return c


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_output_failure_gives_a_clear_error_and_changes_nothing_outside(case: Case, ctx: Ctx):
    action, fragments, after = case.setup(ctx)
    before = snapshot(ctx.tmp, skip=ctx.out)
    with pytest.raises(SuiteError) as err:
        action()
    assert isinstance(err.value, OutputError), f"{type(err.value).__name__}: {err.value}"
    message = str(err.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message lacks {missing}:\n{message}"
    assert snapshot(ctx.tmp, skip=ctx.out) == before, "something outside OUTPUT_DIR changed"
    if after is not None:
        after()


def test_os_failures_stay_oserrors_for_code_that_handles_them(tmp_path, monkeypatch):
    """An OutputWriteError is an OutputError and an OSError (RunCache.write still treats it as a skipped cache)."""
    monkeypatch.setattr(Path, "write_text", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError) as err:
        atomic.write_text(tmp_path / "a.txt", "x")
    assert isinstance(err.value, OutputError) and err.value.errno == errno.ENOSPC
    cache = RunCache(tmp_path, "k")
    monkeypatch.setattr(np, "savez", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    cache.write(".npz", "predictions", {"x": np.zeros(2)})   # no error: the cache is an optimisation
    assert not list((tmp_path / ".cache").iterdir())


# ------------------------------------------------------------------------------------------------ the clean-up
def test_orphan_sweep_removes_only_the_suites_own_temporaries_of_dead_runs(ctx):
    out = ctx.outputs()
    dead = dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        user_files = []
        for folder in (ctx.out, ctx.out / "worst_predictions", ctx.out / "deep_dive", ctx.out / ".cache",
                       ctx.out / "notes"):
            folder.mkdir(exist_ok=True)
            for name in USER_TEMPS:
                (folder / name).write_bytes(b"user")
                user_files.append(folder / name)
        keep = user_files + [
            suite_temp(ctx.out, "index.html", live.pid),                           # a concurrent run, in flight
            suite_temp(ctx.out / "worst_predictions", "class_001_x.png", live.pid),
            suite_temp(ctx.out, "index.html", os.getpid(), rand="ownrun00"),      # this run's own
            suite_temp(ctx.out, "settings.json", dead),                           # not a name the suite writes
            suite_temp(ctx.out / "notes", "index.html", dead),                    # not a folder the suite writes
            suite_temp(ctx.out, "index.html", dead, host="0123abcd"),             # another host, recent
            ctx.out / f".index.html.gradcam_{atomic.HOST}_{dead}_abcd1234.tmp.png",   # suffix not the target's
        ]
        gone = [
            suite_temp(ctx.out, "index.html", dead),
            suite_temp(ctx.out, MANIFEST, dead),
            suite_temp(ctx.out / "worst_predictions", "class_001_x.png", dead),
            suite_temp(ctx.out / "deep_dive", "group_pair_a_to_b.png", dead),
            suite_temp(ctx.out / ".cache", "0123456789abcdef0123.npz", dead),
            suite_temp(ctx.out, "index.html", dead, host="0123abcd", rand="old00000"),   # another host, old
        ]
        for path in keep + gone:
            path.write_bytes(b"x")
        day_old = time.time() - atomic.FOREIGN_TEMP_AGE_S - 60
        os.utime(gone[-1], (day_old, day_old))
        # a link named like an orphan is never followed nor removed
        (ctx.user / "target.png").write_bytes(b"user")
        link = suite_temp(ctx.out, "top_confused_pairs.png", dead)
        link.symlink_to(ctx.user / "target.png")
        keep.append(link)
        before = snapshot(ctx.tmp, skip=ctx.out)
        removed = out.remove_orphan_temps()
        assert sorted(removed) == sorted(gone)
        assert all(p.exists() or p.is_symlink() for p in keep) and not any(p.exists() for p in gone)
        assert snapshot(ctx.tmp, skip=ctx.out) == before
    finally:
        live.kill()
        live.wait()


MALFORMED = {
    "number": "5",
    "list-with-non-strings": "[1, 2, null]",
    "string": '"abc"',
    "object": '{"a": 1, "b": 2}',
    "null": "null",
    "true": "true",
    "nested-lists": '[["a"], ["b", "c"]]',
    "deeply-nested": "[" * 100000 + "]" * 100000,
    "not-json": "a\nb\nc\n",
    "not-utf8": b"\xff\xfe[\"a\"]",
    "strings-not-names-the-suite-writes": '["a", "b", "c", "notes/todo.txt"]',
    "paths-leaving-the-folder": None,   # filled in with the test's paths
    "dot-segments": '["worst_predictions/../a", "./b", "deep_dive//c", "worst_predictions/./class_001.png"]',
    "wildcard-spanning-folders": '["confused_pair_x/a.png", "worst_predictions/class_/b.png"]',
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_manifest_deletes_nothing_and_never_crashes(ctx, kind):
    out = ctx.outputs()
    for name in ("a", "b", "c", "notes/todo.txt"):
        (ctx.out / name).parent.mkdir(parents=True, exist_ok=True)
        (ctx.out / name).write_text("the user's file")
    text = MALFORMED[kind]
    if text is None:
        text = json.dumps([str(ctx.user / "thesis.docx"), "../user/thesis.docx", "../../" + ctx.tmp.name + "/a",
                           "\\..\\user\\thesis.docx", "C:/x", "//host/share/x"])
    (ctx.out / MANIFEST).write_bytes(text if isinstance(text, bytes) else text.encode())
    before = snapshot(ctx.tmp, skip=ctx.out / MANIFEST)
    assert out.remove_stale() == []
    assert snapshot(ctx.tmp, skip=ctx.out / MANIFEST) == before
    assert out.warnings and all(MANIFEST in w and ("ignored" in w or "left alone" in w) for w in out.warnings)


def test_stale_outputs_are_removed_but_never_through_a_link(ctx):
    out = ctx.outputs()
    stale = ["confused_pair_9_a_to_b.png", "worst_predictions/class_007_x.png", "deep_dive/group_pair_a_to_b.png"]
    for rel in stale:
        (ctx.out / rel).parent.mkdir(exist_ok=True)
        (ctx.out / rel).write_bytes(b"an earlier run's output")
    (ctx.user / "picture.png").write_bytes(b"the user's picture")
    (ctx.out / "confused_pair_8_linked.png").symlink_to(ctx.user / "picture.png")
    (ctx.out / "confused_pair_7_folder.png").mkdir()
    (ctx.out / "notes.txt").write_text("the user's")
    (ctx.out / "index.html").write_text("kept")   # this run's (below: also_current)
    listed = stale + ["confused_pair_8_linked.png", "confused_pair_7_folder.png", "notes.txt", "index.html"]
    (ctx.out / MANIFEST).write_text(json.dumps(listed))
    before = snapshot(ctx.tmp, skip=ctx.out)
    assert sorted(out.remove_stale(also_current=("index.html",))) == sorted(stale)
    assert not any((ctx.out / rel).exists() for rel in stale)
    assert (ctx.out / "confused_pair_8_linked.png").is_symlink() and (ctx.out / "confused_pair_7_folder.png").is_dir()
    assert (ctx.out / "notes.txt").read_text() == "the user's" and (ctx.out / "index.html").read_text() == "kept"
    assert snapshot(ctx.tmp, skip=ctx.out) == before
    assert any("'notes.txt'" in w for w in out.warnings)


def test_every_output_a_run_writes_is_a_name_the_clean_up_knows(ctx):
    """OUTPUT_PATTERNS are what the code writes: a full run (deep dive included) writes only names that match,
    and the user's files and temporaries beside them survive it, with a manifest of the wrong type."""
    ctx.out.mkdir()
    for name in ("a", "b", "c") + USER_TEMPS + (".write_test", ".write-probe"):
        (ctx.out / name).write_text("the user's file")
    (ctx.out / "worst_predictions").mkdir()
    (ctx.out / "worst_predictions" / ".thesis.docx.k9_x.tmp.docx").write_text("the user's file")
    (ctx.out / MANIFEST).write_text('"abc"')
    before = snapshot(ctx.tmp, skip=ctx.out)
    an = Analysis(ctx.params(), progress=False)
    an.run_all()
    manifest = json.loads((ctx.out / MANIFEST).read_text())
    assert any(rel.startswith("deep_dive/") for rel in manifest)
    assert [rel for rel in manifest if not is_output_name(rel)] == []
    for name in ("a", "b", "c") + USER_TEMPS + (".write_test", ".write-probe"):
        assert (ctx.out / name).read_text() == "the user's file", name
    assert (ctx.out / "worst_predictions" / ".thesis.docx.k9_x.tmp.docx").is_file()
    report = an.results["report"]
    assert report.values["removed_stale"] == []
    assert any("is not a list of file names" in note for note in report.notes)
    assert snapshot(ctx.tmp, skip=ctx.out) == before
    assert len(OUTPUT_PATTERNS) == len(set(OUTPUT_PATTERNS))


def test_every_described_output_is_a_name_the_clean_up_knows():
    from helpers.steps.report import DESCRIPTIONS
    examples = {"worst_predictions/": "worst_predictions/class_000_apple.png"}
    for key, _ in DESCRIPTIONS:
        rel = examples.get(key, key + "a_to_b.png" if key.endswith("_") else key)
        assert is_output_name(rel), rel


# ------------------------------------------------------------------------------------------------ the write check
def test_check_writable_uses_a_unique_probe_and_checks_the_subfolders(ctx, monkeypatch):
    ctx.out.mkdir()
    for name in (".write_test", ".write-probe"):
        (ctx.out / name).write_text("the user's file")
    (ctx.out / "deep_dive").mkdir()
    check_writable(ctx.out, ["worst_predictions", "deep_dive"])   # a missing subfolder is fine
    assert sorted(p.name for p in ctx.out.iterdir()) == [".write-probe", ".write_test", "deep_dive"]
    assert (ctx.out / ".write_test").read_text() == "the user's file"
    assert not list((ctx.out / "deep_dive").iterdir())
    original = atomic.new_temp

    def read_only_deep_dive(path):   # root ignores permissions: the OS's answer for a read-only subfolder
        if path.parent.name == "deep_dive":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return original(path)
    monkeypatch.setattr(atomic, "new_temp", read_only_deep_dive)
    with pytest.raises(OutputError) as err:
        Analysis(ctx.params(MODEL_PATH=str(ctx.tmp / "missing.pt")), progress=False)
    assert f"{(ctx.out / 'deep_dive').resolve()} is not writable (Permission denied)" in str(err.value)
    assert "set OUTPUT_DIR" in str(err.value)


# ------------------------------------------------------------------------------------------------ the mode
@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_outputs_get_the_mode_of_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        assert atomic.current_umask() == umask
        out = Outputs(tmp_path / "out")
        out.write_text("x", "analysis_summary.txt")
        out.save_csv(pd.DataFrame({"a": [1]}), "per_class_accuracy.csv")
        out.save_figure(_figure(), "top_confused_pairs.png")   # drawn by the figure worker process
        out.save_figure(_picture(), "worst_predictions", "class_000_apple.png")   # the writer thread
        out.close()
        cache = RunCache(tmp_path / "out", "k")
        cache.write(".npz", "predictions", {"x": np.zeros(2)})
        out.write_manifest(out.files())
        files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
        assert len(files) == 6
        modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
        assert set(modes.values()) == {oct(mode)}, modes
    finally:
        os.umask(previous)


# ------------------------------------------------------------------------------------------------ the figure worker
PARENT = """
import os, pickle, signal, struct, sys, time
sys.path.insert(0, {repo!r})
from helpers.files import background
worker = background._FigureWorker()
worker.run(pickle.dumps((time.sleep, (0.0,))))       # the worker is up and serving
if sys.argv[1] == "parent-dies":                     # the parent dies while the worker is busy
    job = pickle.dumps((time.sleep, (1.0,)))
    worker.proc.stdin.write(struct.pack("<Q", len(job)) + job)
    worker.proc.stdin.flush()
else:                                                # only the worker reacts to the group's SIGINT here
    signal.signal(signal.SIGINT, signal.SIG_IGN)
print(worker.proc.pid, flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"   # exited, waiting to be reaped
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc")
@pytest.mark.parametrize("how", ["parent-dies", "sigint-to-the-process-group"])
def test_the_figure_worker_exits_quietly(tmp_path, how):
    """A dead parent (the worker's reply meets a broken pipe) or a SIGINT to the process group (Ctrl-C, a Jupyter
    kernel interrupt or restart) ends the worker without a traceback."""
    err = tmp_path / "stderr.txt"
    with open(err, "wb") as fh:
        parent = subprocess.Popen([sys.executable, "-c", PARENT.format(repo=str(REPO)), how], stdout=subprocess.PIPE,
                                  stderr=fh, start_new_session=True, cwd=tmp_path)   # not the repository:
        # the worker finds the package wherever the caller's working folder is
    try:
        worker = int(parent.stdout.readline())
        if how == "parent-dies":
            parent.kill()
            parent.wait()
        else:
            os.killpg(parent.pid, signal.SIGINT)
        deadline = time.time() + 60
        while not _gone(worker) and time.time() < deadline:
            time.sleep(0.05)
        assert _gone(worker), "the worker did not exit"
    finally:
        parent.kill()
        parent.wait()
    text = err.read_text(errors="replace")
    assert "Traceback" not in text and "Error" not in text and "Exception" not in text, text
