"""Start a throwaway JupyterLab server for browser tests (tests/test_jupyterlab.py).

The server is this venv's (`sys.executable -m jupyterlab`), listens on 127.0.0.1 on a free port with a random
token, and is isolated from the user's Jupyter setup: its config, data, runtime, settings and workspace folders
are fresh temporary ones, and the only kernelspec it sees first is `python3` = this interpreter, so the
notebook's kernel is this venv's python whatever else is installed on the machine.

    with jupyterlab_server(root_dir, env={"GRADCAM_DEVICE": "cpu"}) as lab:
        page.goto(lab.url("lab/tree/GradCAM_Analysis.ipynb"))
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional


@dataclass
class LabServer:
    port: int
    token: str
    root_dir: Path
    process: subprocess.Popen
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def url(self, path: str = "lab") -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.base}{path.lstrip('/')}{sep}token={self.token}"

    def api(self, path: str, timeout: float = 5.0):
        req = urllib.request.Request(self.base + "api/" + path.lstrip("/"),
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode())

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_kernelspec(data_dir: Path) -> None:
    spec = data_dir / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test venv)", "language": "python", "metadata": {"debugger": False}}))


# User settings of the fresh profile: no "receive Jupyter news?" toast and no update check (CI is offline).
_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}


@contextlib.contextmanager
def jupyterlab_server(root_dir: Path, env: Optional[Mapping[str, str]] = None,
                      startup_timeout: float = 90.0) -> Iterator[LabServer]:
    """Run `jupyter lab` serving `root_dir` until the block ends; the process group is always terminated."""
    root_dir = Path(root_dir).resolve()
    with tempfile.TemporaryDirectory(prefix="jupyter-home-") as home:
        home = Path(home)
        for sub in ("config", "data", "runtime", "settings", "workspaces"):
            (home / sub).mkdir()
        _write_kernelspec(home / "data")
        for rel, values in _SETTINGS.items():
            (home / "settings" / rel).parent.mkdir(parents=True, exist_ok=True)
            (home / "settings" / rel).write_text(json.dumps(values))
        port, token = free_port(), secrets.token_hex(24)
        server_env = dict(os.environ)
        server_env.update(env or {})
        server_env.update({
            "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
            "JUPYTER_PATH": str(home / "data"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
            "JUPYTER_PLATFORM_DIRS": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        })
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root_dir}",
               "--ServerApp.open_browser=False", f"--LabApp.user_settings_dir={home / 'settings'}",
               f"--LabApp.workspaces_dir={home / 'workspaces'}"]
        log = home / "server.log"
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(cmd, cwd=root_dir, env=server_env, stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        lab = LabServer(port, token, root_dir, proc, log)
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"jupyter lab exited with {proc.returncode}:\n{lab.log_tail()}")
                try:
                    lab.api("status", timeout=2)
                    break
                except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"jupyter lab did not answer in {startup_timeout:.0f} s:\n{lab.log_tail()}")
                    time.sleep(0.25)
            yield lab
        finally:
            _stop(proc)


def children(pid: int) -> list[int]:
    """Every live descendant of `pid` (Linux /proc). Kernels run in a session of their own, outside the
    server's process group, so they are found by parent."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the server's process group (the server shuts its kernels down), then SIGKILL whatever of it
    and of its kernels is left."""
    leftovers = children(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in leftovers:   # kernels that outlived the server
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
