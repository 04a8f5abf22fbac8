"""A Ray the jobs start for themselves runs without a token, so nothing of it may listen beyond
loopback: every listening socket of its processes is checked, in a Ray of its own."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]

# Starts Ray as a job does, runs a task (so a worker is up too), prints the session folder
# and keeps Ray up until stdin closes.
_DRIVER = """
import logging, sys
import ray
from jobs._ray_util import init_ray
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
init_ray(None, local_cpus=1)
ray.get(ray.remote(lambda: 1).remote())
print(ray._private.worker._global_node.get_session_dir_path(), flush=True)
sys.stdin.read()
ray.shutdown()
"""


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _ray_processes(driver: psutil.Process, session_dir: str) -> dict[int, str]:
    """pid → name of the driver, its descendants and any process naming the session folder."""
    procs = {p.pid: p for p in driver.children(recursive=True)}
    procs[driver.pid] = driver
    for p in psutil.process_iter(["cmdline"]):
        if session_dir in " ".join(p.info["cmdline"] or ()):
            procs[p.pid] = p
    names = {}
    for pid, p in procs.items():
        try:
            names[pid] = p.name()
        except psutil.NoSuchProcess:
            continue
    return names


def _listening(pids: dict[int, str]) -> list[tuple[str, str, int]]:
    return [(pids[c.pid], c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids]


@pytest.mark.slow
def test_local_ray_of_a_job_listens_on_loopback_only():
    # The variable that used to keep Ray on loopback is left unset, as on a fresh shell; so
    # is RAY_AUTH_MODE, so the job turns token auth off itself and must say why that is safe.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER], cwd=REPO, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        session_dir = proc.stdout.readline().strip()
        assert session_dir, proc.communicate(timeout=60)[1][-3000:]
        sockets = _listening(_ray_processes(psutil.Process(proc.pid), session_dir))
    finally:
        _, stderr = proc.communicate("", timeout=120)
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the scan did find Ray's servers
    exposed = [s for s in sockets if not _is_loopback(s[1])]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    assert proc.returncode == 0, stderr[-3000:]
    assert "listening on 127.0.0.1 only: token auth disabled" in stderr
