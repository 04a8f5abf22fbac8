"""A real Ray head for tests that submit jobs: ``ray start --head`` on 127.0.0.1 with free
ports, the venv first on PATH and no AWS_*/MLFLOW_* in its environment. Test modules import
:func:`running_ray_head` into a fixture of their own (a conftest.py here would shadow
tests/conftest.py for ``from conftest import ...``)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Head:
    address: str  # the dashboard, as `ray job submit --address` takes it
    env: dict  # environment of the head, and of the `ray job submit` shell


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_dashboard(url: str, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"no Ray dashboard at {url} after {timeout_s}s")


def _stop(proc: subprocess.Popen, temp_dir: str) -> None:
    """End the head's process group and any process still using its temp dir (workers are
    put in groups of their own)."""
    procs = [p for p in psutil.process_iter(["cmdline"])
             if temp_dir in " ".join(p.info["cmdline"] or ())]
    try:
        procs += psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGTERM)
    except (psutil.NoSuchProcess, ProcessLookupError):
        pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()
    proc.wait(timeout=30)


def running_ray_head():
    """``ray start --head --block`` on 127.0.0.1 with free ports and a temp dir of its own,
    the venv first on PATH (so a job's ``python`` is the venv's) and no AWS_*/MLFLOW_* in its
    environment: what a submitted job sees of those comes from the submission alone."""
    temp_dir = tempfile.mkdtemp(prefix="t2v-ray-", dir="/tmp")  # short: socket paths ≤ 107
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO),
               RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0")
    dash = _free_port()
    ports = {"--port": _free_port(), "--dashboard-port": dash,
             "--dashboard-agent-listen-port": _free_port(),
             "--ray-client-server-port": _free_port(), "--metrics-export-port": _free_port()}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus", "1",
           "--disable-usage-stats", "--temp-dir", temp_dir,
           *[str(x) for kv in ports.items() for x in kv]]
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(cmd, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dash}"
        _wait_for_dashboard(url, proc)
        yield Head(address=url, env=env)
    finally:
        _stop(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
