"""Parquet storage: atomic and idempotent writes, reads of files and partitioned datasets."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from t2v_core import storage
from t2v_core.storage import MATRIX_SCHEMA, StorageRoot, conform, filesystem_for, redact_uri


def _rows(ids):
    return pa.table(
        {
            "task_id": ids,
            "expert_id": ["e"] * len(ids),
            "test_error": [0.1 * i for i in range(len(ids))],
        }
    )


def test_write_table_atomic_roundtrip_and_no_leftovers(tmp_path):
    root = StorageRoot(tmp_path / "root")
    uri = root.write_table_atomic("zoo/x.parquet", _rows(["a", "b"]))
    assert uri == f"{tmp_path}/root/zoo/x.parquet"
    assert root.read_table("zoo/x.parquet").column("task_id").to_pylist() == ["a", "b"]
    root.write_table_atomic("zoo/x.parquet", _rows(["c"]))
    assert root.read_table("zoo/x.parquet").column("task_id").to_pylist() == ["c"]
    assert sorted(os.listdir(tmp_path / "root" / "zoo")) == ["x.parquet"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    root = StorageRoot(tmp_path)
    root.write_table_atomic("t.parquet", _rows(["old"]))

    def boom(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        root.write_table_atomic("t.parquet", _rows(["new"]))
    monkeypatch.undo()
    assert root.read_table("t.parquet").column("task_id").to_pylist() == ["old"]
    assert os.listdir(tmp_path) == ["t.parquet"]


def test_write_part_is_idempotent(tmp_path):
    root = StorageRoot(tmp_path)
    first = root.write_part("matrix", _rows(["a", "b"]), ["task_id", "expert_id"])
    data = root.read_bytes(first)
    mtime = os.stat(tmp_path / first).st_mtime_ns
    # Same rows in another order: same name, same bytes, file untouched.
    again = root.write_part("matrix", _rows(["a", "b"]).take([1, 0]), ["task_id", "expert_id"])
    assert again == first
    assert root.list("matrix") == [first]
    assert root.read_bytes(first) == data
    assert os.stat(tmp_path / first).st_mtime_ns == mtime
    other = root.write_part("matrix", _rows(["c"]), ["task_id", "expert_id"])
    assert other != first and root.list("matrix") == sorted([first, other])
    table = root.read_table("matrix", schema=MATRIX_SCHEMA)
    assert table.schema == MATRIX_SCHEMA
    assert sorted(table.column("task_id").to_pylist()) == ["a", "b", "c"]


def test_read_partitioned_dataset_and_empty_dir(tmp_path):
    root = StorageRoot(tmp_path)
    t = pa.table({"task_id": ["a"], "x": [1]})
    root.write_part("emb/probe=r18/method=mc", t, ["task_id"])
    root.write_part("emb/probe=r34/method=mc", t, ["task_id"])
    (tmp_path / "emb" / "probe=r18" / "method=mc" / ".tmp-junk.parquet").write_bytes(b"half")
    table = root.read_table("emb").sort_by("probe")
    assert table.column("probe").to_pylist() == ["r18", "r34"]
    assert table.column("method").to_pylist() == ["mc", "mc"]
    assert root.read_table("emb/probe=r34").column("probe").to_pylist() == ["r34"]
    (tmp_path / "empty").mkdir()
    assert root.read_table("empty", schema=MATRIX_SCHEMA).num_rows == 0
    with pytest.raises(FileNotFoundError, match="nope"):
        root.read_table("nope")


def test_bytes_roundtrip_and_missing(tmp_path):
    root = StorageRoot(tmp_path)
    root.write_bytes_atomic("models/w.pt", b"\x00weights")
    assert root.read_bytes("models/w.pt") == b"\x00weights"
    assert root.exists("models/w.pt") and not root.exists("models/x.pt")
    with pytest.raises(FileNotFoundError, match="models/x.pt"):
        root.read_bytes("models/x.pt")


def test_conform_orders_casts_and_requires():
    t = pa.table({"expert_id": ["e"], "task_id": ["t"], "epochs": pa.array([3], pa.int64())})
    out = conform(t, MATRIX_SCHEMA)
    assert out.schema == MATRIX_SCHEMA and out.column("epochs").to_pylist() == [3]
    with pytest.raises(KeyError, match="expert_id"):
        conform(pa.table({"task_id": ["t"]}), MATRIX_SCHEMA)


def test_s3_endpoint_from_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    fs, path = filesystem_for("s3://bkt/pre/fix/")
    assert path == "bkt/pre/fix" and fs.client_kwargs["endpoint_url"] == "http://127.0.0.1:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    fs, _ = filesystem_for("s3://bkt/x")
    assert fs.client_kwargs["endpoint_url"] == "http://127.0.0.1:2"


def test_redact_uri():
    assert redact_uri("s3://KEY:SECRET@bucket/p") == "s3://bucket/p"
    assert redact_uri("/local/path") == "/local/path"


def test_s3_root_roundtrip(moto_s3):
    root = StorageRoot(f"s3://{moto_s3.bucket}/storage-test")
    assert repr(root) == f"StorageRoot('s3://{moto_s3.bucket}/storage-test')"
    root.write_table_atomic("zoo/t.parquet", _rows(["a"]))
    assert root.read_table("zoo/t.parquet").column("task_id").to_pylist() == ["a"]
    first = root.write_part("matrix", _rows(["a", "b"]), ["task_id"])
    assert root.write_part("matrix", _rows(["b", "a"]), ["task_id"]) == first
    assert root.list("matrix") == [first]
    assert root.list("", recursive=True) == sorted(["zoo/t.parquet", first])
    assert root.read_table("matrix").num_rows == 2
    root.write_part("matrix", _rows(["c"]), ["task_id"])  # several parts: fetched in one batch
    assert sorted(root.read_table("matrix").column("task_id").to_pylist()) == ["a", "b", "c"]
    root.write_bytes_atomic("w.bin", b"abc")
    assert root.read_bytes("w.bin") == b"abc"
    assert root.join("a", "b.parquet") == f"s3://{moto_s3.bucket}/storage-test/a/b.parquet"


def test_single_files_by_uri_local_and_s3(tmp_path, moto_s3, monkeypatch):
    """Weights and models are single files given by a URI: one writer and one reader for both."""
    local = tmp_path / "deep" / "w.pt"
    assert storage.atomic_write_bytes(local, b"one") == str(local)
    storage.atomic_write_bytes(str(local), b"two")
    assert storage.read_uri_bytes(local) == b"two" and os.listdir(local.parent) == ["w.pt"]
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        storage.read_uri_bytes(tmp_path / "nope.pt")

    def boom(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        storage.atomic_write_bytes(local, b"three")
    monkeypatch.undo()
    assert storage.read_uri_bytes(local) == b"two" and os.listdir(local.parent) == ["w.pt"]

    uri = f"s3://{moto_s3.bucket}/single/w.pt"
    assert storage.atomic_write_bytes(uri, b"remote") == uri
    assert storage.read_uri_bytes(uri) == b"remote"
    assert StorageRoot(f"s3://{moto_s3.bucket}/single").read_bytes("w.pt") == b"remote"
    with pytest.raises(FileNotFoundError, match=f"s3://{moto_s3.bucket}/single/nope"):
        storage.read_uri_bytes(f"s3://{moto_s3.bucket}/single/nope")
