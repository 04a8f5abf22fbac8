"""The S3 server is down when a job starts, or goes down between the compute and the final
write: the job exits non-zero with one clear error line naming the root and the endpoint (no
traceback), writes nothing, and a re-run once S3 is back completes with one row per key, as
any Parquet reader sees the raw prefix (``pyarrow.dataset``).

A moto server of its own on a port of its own, stopped and started again on the same port; its
in-memory buckets outlive the server, as a real S3's would.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest
from moto.server import ThreadedMotoServer

from jobs import embed_tasks
from t2v_core.embedding.store import EmbeddingWriter
from t2v_core.zoo.register import register_folders

REPO = Path(__file__).resolve().parents[2]
SIZE = 12
NAMES = ["ant", "bee", "cow"]


class Moto:
    """A moto S3 server on a fixed port of its own that really stops listening when stopped."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server._server.server_close()  # release the port: connections are refused
            self._server = None

    def keys(self, bucket: str) -> list[str]:
        client = boto3.client("s3", endpoint_url=self.endpoint)
        return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))

    def raw_rows(self, prefix: str) -> list[tuple[str, str]]:
        """(task_id, content_hash) of every embedding row under ``bucket/prefix``."""
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http",
                               access_key=os.environ["AWS_ACCESS_KEY_ID"],
                               secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                               region="us-east-1")
        table = ds.dataset(f"{prefix}/embeddings", filesystem=fs, format="parquet",
                           partitioning="hive").to_table(columns=["task_id", "content_hash"])
        return sorted(zip(*(table.column(c).to_pylist() for c in table.column_names),
                          strict=True))


@pytest.fixture
def s3(moto_s3, monkeypatch):
    """A running :class:`Moto` with one bucket, the AWS variables pointing at it (the fake
    credentials of ``moto_s3``); stopped at the end."""
    server = Moto()
    server.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    server.bucket = f"t2v-outage-{uuid.uuid4().hex[:6]}"
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=server.bucket)
    yield server
    server.stop()


def _zoo(tmp_path: Path, image_folder, s3: Moto) -> str:
    """Local task folders registered under an s3:// root; returns the root."""
    for i, name in enumerate(NAMES):
        image_folder(tmp_path / "tasks", name, {"cat": 4, "dog": 4}, {"cat": 1, "dog": 1},
                     seed=i, size=SIZE)
    root = f"s3://{s3.bucket}/zoo"
    register_folders(str(tmp_path / "tasks"), root)
    return root


def _args(root: str, *extra: str) -> list[str]:
    return ["--root", root, "--probe", "small_cnn", "--image-size", str(SIZE), "--no-progress",
            "--no-tracking", *extra]


@pytest.mark.slow
def test_s3_down_at_start_fails_in_one_line_naming_the_endpoint(
        ray_local, s3, tmp_path, image_folder):
    root = _zoo(tmp_path, image_folder, s3)
    registered = s3.keys(s3.bucket)
    s3.stop()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    down = subprocess.run([sys.executable, "-m", "jobs.embed_tasks", *_args(root)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert down.returncode == 1, down.stderr[-3000:]
    errors = [line for line in down.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, down.stderr[-3000:]
    assert f"cannot read the zoo manifest under {root}" in errors[0]
    assert s3.endpoint in errors[0]  # where it tried to connect
    assert "Traceback" not in down.stderr, down.stderr[-3000:]

    s3.start()
    assert s3.keys(s3.bucket) == registered  # nothing written
    summary = embed_tasks.run(embed_tasks.parse_args(_args(root)))
    assert sorted(summary.done) == NAMES and not summary.failed
    assert sorted(t for t, _ in s3.raw_rows(f"{s3.bucket}/zoo")) == NAMES


@pytest.mark.slow
def test_s3_down_at_the_final_write_keeps_nothing_half_written_and_a_rerun_completes(
        ray_local, s3, tmp_path, image_folder, monkeypatch, caplog):
    root = _zoo(tmp_path, image_folder, s3)
    registered = s3.keys(s3.bucket)
    flush = EmbeddingWriter.flush
    went_down = []

    def stop_s3_then_flush(self):  # every task computed, nothing written yet
        if self._pending and not went_down:
            went_down.append(len(self._pending))
            s3.stop()
        return flush(self)

    # --batch 10: all three tasks wait for the final write
    with monkeypatch.context() as patch, caplog.at_level(logging.ERROR):
        patch.setattr(EmbeddingWriter, "flush", stop_s3_then_flush)
        rc = embed_tasks.main(_args(root, "--batch", "10", "--write-retries", "1"))
    assert rc == 1 and went_down == [len(NAMES)]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "cannot write " in errors[0] and root in errors[0], errors
    assert s3.endpoint in errors[0] and "re-run the job to finish" in errors[0]

    s3.start()  # back, same address
    assert s3.keys(s3.bucket) == registered  # nothing half-written
    summary = embed_tasks.run(embed_tasks.parse_args(_args(root)))
    assert sorted(summary.done) == NAMES and not summary.failed
    rows = s3.raw_rows(f"{s3.bucket}/zoo")
    assert sorted(t for t, _ in rows) == NAMES  # one row per key
    again = embed_tasks.run(embed_tasks.parse_args(_args(root)))
    assert again.done == [] and sorted(again.up_to_date) == NAMES
    assert s3.raw_rows(f"{s3.bucket}/zoo") == rows
