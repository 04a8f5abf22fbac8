"""Shared fixtures: a real moto S3 server and a real Ray on loopback, and tiny image trees."""

from __future__ import annotations

import os
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
def image_folder():
    """The :func:`write_image_folder` helper."""
    return write_image_folder


@pytest.fixture
def write_png():
    """The :func:`write_image` helper."""
    return write_image
