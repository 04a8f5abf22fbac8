"""Shared fixtures: a real moto S3 server, a real MLflow server and a real Ray on loopback, and
tiny image trees."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

# Ray on loopback only, without token auth (nothing here listens beyond 127.0.0.1).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@dataclass
class MotoS3:
    endpoint_url: str
    bucket: str
    client: object

    def upload_tree(self, local: Path, prefix: str) -> str:
        """Copy a local folder under ``s3://<bucket>/<prefix>`` and return that URI."""
        local = Path(local)
        for f in sorted(local.rglob("*")):
            if f.is_file():
                key = f"{prefix.strip('/')}/{f.relative_to(local).as_posix()}"
                self.client.put_object(Bucket=self.bucket, Key=key, Body=f.read_bytes())
        return f"s3://{self.bucket}/{prefix.strip('/')}"


@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server on 127.0.0.1 (free port), one bucket, and the AWS variables that point
    boto3/s3fs at it with fake credentials, for the whole session."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="t2v-test")
        yield MotoS3(endpoint_url=endpoint, bucket="t2v-test", client=client)
    server.stop()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (ray.init costs seconds): 2 CPUs, no dashboard.

    Tests that need their own cluster (ray.cluster_utils.Cluster, node kills) run it in a
    subprocess so that this one stays up.
    """
    import ray

    # address="local": always a new Ray of our own, never one another process left running
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=256 * 1024**2, configure_logging=False)
    yield ray
    ray.shutdown()


def write_image(path: Path, seed: int, size: int = 8, mode: str = "RGB", fmt: str = "PNG") -> None:
    """A small random image; ``seed`` decides its pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode).save(path, format=fmt)


def write_image_folder(
    base: Path,
    task: str,
    train: dict[str, int],
    test: dict[str, int] | None,
    *,
    seed: int = 0,
    size: int = 8,
    mode: str = "RGB",
) -> Path:
    """``base/task/{train,test}/<class>/<i>.png`` with the given counts per class; ``test=None``
    leaves out the test split. Returns the task folder."""
    task_dir = Path(base) / task
    for split, counts in (("train", train), ("test", test)):
        if counts is None:
            continue
        for c, n in counts.items():
            (task_dir / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                write_image(
                    task_dir / split / c / f"{i}.png",
                    seed=zlib.crc32(f"{seed}/{split}/{c}/{i}".encode()),
                    size=size,
                    mode=mode,
                )
    return task_dir


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test: small tensors run faster, and results are
    bit-identical only per thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def image_folder():
    """The :func:`write_image_folder` helper."""
    return write_image_folder


@pytest.fixture
def write_png():
    """The :func:`write_image` helper."""
    return write_image


@pytest.fixture(scope="session")
def write_task_folder():
    """The :func:`write_image_folder` helper, for fixtures of any scope (a zoo built once per
    module)."""
    return write_image_folder


@contextlib.contextmanager
def running_mlflow_server(moto_s3, workdir: Path, artifacts_prefix: str):
    """A real ``mlflow server --workers 1`` on 127.0.0.1 (free port) for the block: sqlite
    metadata in ``workdir``, artifacts proxied to the moto S3 server under
    ``artifacts_prefix``. Yields its URL; stops the server and its workers afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_S3_ENDPOINT_URL"] = moto_s3.endpoint_url
    server_log = workdir / "server.log"
    with open(server_log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", "127.0.0.1",
             "--port", str(port), "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
             "--artifacts-destination", f"s3://{moto_s3.bucket}/{artifacts_prefix}"],
            cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not come up: "
                                       f"{server_log.read_text()[-3000:]}") from None
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def mlflow_server(moto_s3, tmp_path_factory):
    """One real ``mlflow server`` for the session (see :func:`running_mlflow_server`), artifacts
    under ``mlflow-server-artifacts/``. Yields its URL."""
    with running_mlflow_server(moto_s3, tmp_path_factory.mktemp("mlflow-server"),
                               "mlflow-server-artifacts") as url:
        yield url
