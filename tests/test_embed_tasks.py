"""The distributed embedding job against a real Ray and a real S3 protocol (moto server).

Tiny zoos (12 px images, the small_cnn probe) keep each case to seconds; the cases check the
promises of the job: same vectors as the library, re-runs that do only what is missing,
failures recorded per task, and nothing lost or duplicated when a node or S3 goes away.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from jobs import embed_tasks
from jobs._ray_util import worker_runtime_env
from t2v_core.embedding import embed_run
from t2v_core.embedding.fisher import task2vec
from t2v_core.embedding.probes import build_probe
from t2v_core.embedding.store import (
    KEY_COLUMNS,
    EmbedConfig,
    EmbeddingWriter,
    EmbedSummary,
    TaskOutcome,
    clean_error,
    dataset_path,
    embed_task,
    embeddings_table,
    failures_path,
    legacy_path,
    plan_embeddings,
    read_embedding_rows,
    read_embeddings,
    read_failures,
    read_filter_names,
    write_filter_names,
)
from t2v_core.recommend.meta_dataset import resolve_embedding_set
from t2v_core.storage import StorageRoot
from t2v_core.zoo.data import load_split
from t2v_core.zoo.manifest import TaskSpec, read_tasks
from t2v_core.zoo.register import register_folders

SIZE = 12
PROBE_ID = "small_cnn-random0"
REPO = Path(__file__).resolve().parents[1]


def _task(base: Path, write, name: str, seed: int) -> Path:
    return write(base, name, {"cat": 5, "dog": 5, "emu": 4}, {"cat": 1, "dog": 1, "emu": 1},
                 seed=seed, size=SIZE)


def _args(root: str, *extra: str) -> list[str]:
    return ["--root", root, "--probe", "small_cnn", "--method", "montecarlo",
            "--image-size", str(SIZE), "--no-progress", *extra]


def _library_vector(spec: TaskSpec) -> np.ndarray:
    """The in-process library call the job must reproduce."""
    probe = build_probe("small_cnn", seed=0)
    images, labels = load_split(spec, "train", SIZE, None, 0)
    emb = task2vec(probe, images, labels, n_classes=spec.n_classes, method="montecarlo",
                   seed=0, task_id=spec.task_id)
    return emb.vector


def _rows_per_task(root: StorageRoot) -> dict[str, int]:
    ids = read_embedding_rows(root, PROBE_ID, "montecarlo").column("task_id").to_pylist()
    return {t: ids.count(t) for t in sorted(set(ids))}


def _s3_objects(client, bucket: str, prefix: str) -> dict[str, str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- library ---------------------------------------------------------------------------------
def _outcome(task_id: str, h: str, value: float = 1.0, dim: int = 3) -> TaskOutcome:
    return TaskOutcome(task_id, h, vector=np.full(dim, value, np.float32), n_samples=4)


def test_writer_batches_keyed_parts_and_reads_newest(tmp_path):
    root = StorageRoot(tmp_path)
    names = ("c:conv:0", "c:conv:1", "c:conv:2")
    writer = EmbeddingWriter(root, "p-1", "montecarlo", names, batch_size=2)
    assert writer.add(_outcome("a", "h1")) == []
    assert len(writer.add(_outcome("b", "h1"))) == 2  # a full batch at once, a part per key
    writer.add(TaskOutcome.failure(
        TaskSpec("c", "f", "/x", "imagefolder", ("u", "v"), 2, 2, "h1"),
        ValueError("bad pixels in s3://user:pw@bucket/c")))
    writer.add(_outcome("a", "h2", value=2.0))  # task a changed: a second row, newer
    assert writer.pending == 0
    assert len(writer.flush()) == 0
    assert writer.summary.done == ["a", "b", "a"] and set(writer.summary.failed) == {"c"}
    assert "user:pw" not in writer.summary.failed["c"]

    assert read_filter_names(root, "p-1") == names
    assert root.list("embeddings/probe=p-1") == ["embeddings/probe=p-1/method=montecarlo"]
    newest = read_embeddings(root, "p-1", "montecarlo")
    assert newest.task_ids == ("a", "b") and newest.content_hashes == ("h2", "h1")
    np.testing.assert_array_equal(newest.row("a"), np.full(3, 2.0, np.float32))
    assert newest.filter_names == names
    spec_a = TaskSpec("a", "f", "/x", "imagefolder", ("u", "v"), 2, 2, "h1")
    at_hash = read_embeddings(root, "p-1", "montecarlo", [spec_a])
    assert at_hash.task_ids == ("a",) and at_hash.vectors[0, 0] == 1.0
    failures = read_failures(root, "p-1", "montecarlo").to_pylist()
    assert [(f["task_id"], f["error_type"], f["transient"]) for f in failures] == [
        ("c", "ValueError", False)]

    with pytest.raises(ValueError, match="different filter names"):
        write_filter_names(root, "p-1", ("other",))
    with pytest.raises(ValueError, match="shape"):
        writer.add(_outcome("d", "h1", dim=5))
    with pytest.raises(ValueError, match="partition"):
        dataset_path("a/b", "montecarlo")
    assert clean_error("read s3://k:s@b/x failed") == "read s3://b/x failed"


def test_writer_writes_every_n_tasks_or_after_the_wait_whichever_first(tmp_path):
    root = StorageRoot(tmp_path)
    now = [0.0]
    writer = EmbeddingWriter(root, "p-1", "montecarlo", ("c:conv:0",), max_wait_s=60.0,
                             clock=lambda: now[0])
    assert writer.batch_size == 8  # a crash loses at most 8 finished tasks by default

    def stored() -> int:
        return len(root.list(dataset_path("p-1", "montecarlo")))

    for i in range(7):
        now[0] += 1.0
        assert writer.add(_outcome(f"t{i}", "h", dim=1)) == []
    assert stored() == 0 and writer.pending == 7
    assert len(writer.add(_outcome("t7", "h", dim=1))) == 8  # the 8th task: before 60 s
    assert stored() == 8 and writer.pending == 0
    # A slow trickle: one task, then nothing for a minute.
    now[0] = 100.0
    writer.add(_outcome("slow", "h", dim=1))
    now[0] = 159.0
    assert writer.flush_if_due() == [] and stored() == 8
    now[0] = 160.0
    assert len(writer.flush_if_due()) == 1 and stored() == 9
    # A result arriving after the wait is written with the one that waited.
    writer.add(_outcome("late1", "h", dim=1))
    now[0] = 230.0
    assert len(writer.add(_outcome("late2", "h", dim=1))) == 2 and stored() == 11


def _raw_rows(root: StorageRoot) -> list[tuple[str, str]]:
    """(task_id, content_hash) of every row on disk, as any Parquet reader sees the folder."""
    import pyarrow.dataset as ds

    table = ds.dataset(root.join("embeddings"), format="parquet", partitioning="hive").to_table(
        columns=["task_id", "content_hash"])
    return sorted(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))


def test_overlapping_runs_leave_one_row_per_key_and_old_parts_stay_readable(
    ray_local, tmp_path, image_folder, monkeypatch
):
    from t2v_core.embedding.fisher import filter_names

    local = tmp_path / "tasks"
    names = ["ant", "bee", "cow", "dog"]
    for i, name in enumerate(names):
        _task(local, image_folder, name, seed=30 + i)
    root_uri = str(tmp_path / "root")
    register_folders(str(local), root_uri)
    root = StorageRoot(root_uri)
    tasks = read_tasks(root)
    # ant and bee: one part holding both keys, as parts were written before.
    probe = build_probe("small_cnn", seed=0)
    write_filter_names(root, PROBE_ID, filter_names(probe.backbone))
    dim = len(filter_names(probe.backbone))
    old = [TaskOutcome(t.task_id, t.content_hash, np.full(dim, 0.5, np.float32), 3)
           for t in tasks[:2]]
    root.write_part(dataset_path(PROBE_ID, "montecarlo"),
                    embeddings_table(old, PROBE_ID, "montecarlo"), KEY_COLUMNS)

    # A second run that planned before the first wrote anything embeds cow and dog again,
    # in other batches: its parts must replace the first run's, not sit beside them.
    stale = plan_embeddings(root, tasks, PROBE_ID, "montecarlo")
    assert [s.task_id for s in stale.todo] == ["cow", "dog"]
    first = embed_tasks.run(embed_tasks.Config(probe="small_cnn", root=root_uri, image_size=SIZE,
                                               batch=2, no_progress=True, tracking=False))
    assert sorted(first.done) == ["cow", "dog"]
    monkeypatch.setattr(embed_run, "plan_embeddings", lambda *a, **k: stale)
    second = embed_tasks.run(embed_tasks.Config(probe="small_cnn", root=root_uri, image_size=SIZE,
                                                batch=1, no_progress=True, tracking=False))
    assert sorted(second.done) == ["cow", "dog"]

    assert _raw_rows(root) == sorted((t.task_id, t.content_hash) for t in tasks)
    got = read_embeddings(root, PROBE_ID, "montecarlo", tasks)
    assert got.task_ids == tuple(names)
    np.testing.assert_array_equal(got.row("bee"), np.full(dim, 0.5, np.float32))
    for spec in tasks[2:]:
        np.testing.assert_allclose(got.row(spec.task_id), _library_vector(spec), rtol=1e-4,
                                   atol=1e-10)


def test_plan_skips_done_and_permanent_failures_but_retries_transient(tmp_path):
    root = StorageRoot(tmp_path)

    def spec(t: str, h: str = "h1") -> TaskSpec:
        return TaskSpec(t, "f", "/x", "imagefolder", ("u", "v"), 2, 2, h)

    writer = EmbeddingWriter(root, "p-1", "empirical", ("c:conv:0",), batch_size=10)
    writer.add(_outcome("done", "h1", dim=1))
    writer.add(TaskOutcome.failure(spec("bad"), ValueError("corrupt")))
    writer.add(TaskOutcome.failure(spec("flaky"), OSError("connection reset")))
    writer.flush()
    tasks = [spec("done"), spec("bad"), spec("flaky"), spec("new"), spec("done2", "h9")]
    plan = plan_embeddings(root, tasks, "p-1", "empirical")
    assert [s.task_id for s in plan.todo] == ["flaky", "new", "done2"]
    assert plan.up_to_date == ("done",) and set(plan.failed_before) == {"bad"}
    again = plan_embeddings(root, tasks, "p-1", "empirical", retry_failed=True)
    assert [s.task_id for s in again.todo] == ["bad", "flaky", "new", "done2"]
    changed = plan_embeddings(root, [spec("bad", "h2")], "p-1", "empirical")
    assert [s.task_id for s in changed.todo] == ["bad"]  # new data, new chance


# -- keyed by training-set size ---------------------------------------------------------------
def _sized_writer(root: StorageRoot, max_per_class: int | None) -> EmbeddingWriter:
    return EmbeddingWriter(root, "p-1", "montecarlo", ("c:conv:0", "c:conv:1"), batch_size=10,
                           config=EmbedConfig(max_per_class=max_per_class))


def test_sizes_share_one_dataset_and_each_reader_gets_its_own(tmp_path):
    root = StorageRoot(tmp_path)
    tasks = [TaskSpec(t, "f", "/x", "imagefolder", ("u", "v"), 2, 2, "h1") for t in "ab"]
    full, five = _sized_writer(root, None), _sized_writer(root, 5)
    full.add(_outcome("a", "h1", 1.0, dim=2))
    five.add(_outcome("a", "h1", 5.0, dim=2))
    five.add(TaskOutcome.failure(tasks[1], ValueError("too few images")))
    full_parts, five_parts = full.flush(), five.flush()
    assert len(set(full_parts + five_parts)) == 3  # one file per (key, size)
    assert root.list("embeddings/probe=p-1") == ["embeddings/probe=p-1/method=montecarlo"]

    def vectors(max_per_class: int | None) -> list[float]:
        got = read_embeddings(root, "p-1", "montecarlo", tasks, max_per_class=max_per_class)
        return got.vectors[:, :1].ravel().tolist()

    assert vectors(None) == [1.0] and vectors(5) == [5.0] and vectors(3) == []
    assert read_embedding_rows(root, "p-1", "montecarlo").column("max_per_class").to_pylist() \
        == [None]
    # what is done, or failed, at one size says nothing of another
    plan = {cap: plan_embeddings(root, tasks, "p-1", "montecarlo",
                                 config=EmbedConfig(max_per_class=cap)) for cap in (None, 5, 3)}
    assert [s.task_id for s in plan[None].todo] == ["b"] and plan[None].up_to_date == ("a",)
    assert plan[5].todo == () and set(plan[5].failed_before) == {"b"}
    assert [s.task_id for s in plan[3].todo] == ["a", "b"]
    assert [r["task_id"] for r in read_failures(root, "p-1", "montecarlo", 5).to_pylist()] \
        == ["b"]
    assert read_failures(root, "p-1", "montecarlo").num_rows == 0
    # writing a key of one size again replaces its file and leaves the other size's alone
    files = root.list("", recursive=True)
    again = _sized_writer(root, 5)
    again.add(_outcome("a", "h1", 6.0, dim=2))
    (part,) = again.flush()
    assert part in five_parts and root.list("", recursive=True) == files
    assert vectors(5) == [6.0] and vectors(None) == [1.0]


def test_parts_of_the_earlier_layouts_still_read(tmp_path):
    """A full-data part without the size column reads as full data (under the name it had),
    and capped-subset embeddings under subsampled/max_per_class=<n>/ read at that size."""
    root = StorageRoot(tmp_path)
    spec = TaskSpec("a", "f", "/x", "imagefolder", ("u", "v"), 2, 2, "h1")
    old = embeddings_table([_outcome("a", "h1", 1.0, dim=2)], "p-1", "montecarlo")
    old_part = root.write_part(dataset_path("p-1", "montecarlo"),
                               old.drop_columns(["max_per_class"]), KEY_COLUMNS)
    legacy = StorageRoot(root.join(legacy_path("", 5)))
    legacy.write_part(dataset_path("p-1", "montecarlo"),
                      embeddings_table([_outcome("a", "h1", 5.0, dim=2)], "p-1", "montecarlo")
                      .drop_columns(["max_per_class"]), KEY_COLUMNS)

    assert read_embeddings(root, "p-1", "montecarlo", [spec]).vectors[:, 0].tolist() == [1.0]
    at_five = read_embeddings(root, "p-1", "montecarlo", [spec], max_per_class=5)
    assert at_five.vectors[:, 0].tolist() == [5.0]
    assert read_embeddings(root, "p-1", "montecarlo", max_per_class=4).task_ids == ()
    for cap in (None, 5):  # nothing to embed again at either size
        plan = plan_embeddings(root, [spec], "p-1", "montecarlo",
                               config=EmbedConfig(max_per_class=cap))
        assert plan.todo == () and plan.up_to_date == ("a",)
    # a full-data row written now keeps the old part's name, so it replaces that file
    writer = _sized_writer(root, None)
    writer.add(_outcome("a", "h1", 2.0, dim=2))
    assert writer.flush() == [old_part]
    assert len(root.list(dataset_path("p-1", "montecarlo"))) == 1
    # a row of size 5 written now is newer than the earlier layout's and wins
    writer = _sized_writer(root, 5)
    writer.add(_outcome("a", "h1", 7.0, dim=2))
    writer.flush()
    assert read_embeddings(root, "p-1", "montecarlo", [spec],
                           max_per_class=5).vectors[:, 0].tolist() == [7.0]


def test_job_embeds_each_size_once_and_each_reader_gets_its_own(ray_local, tmp_path,
                                                                image_folder):
    local = tmp_path / "tasks"
    for i, name in enumerate(["ant", "bee"]):
        _task(local, image_folder, name, seed=40 + i)
    root_uri = str(tmp_path / "root")
    register_folders(str(local), root_uri)
    root, tasks = StorageRoot(root_uri), read_tasks(StorageRoot(root_uri))

    def embed(max_per_class: int | None) -> EmbedSummary:
        return embed_tasks.run(embed_tasks.Config(
            probe="small_cnn", root=root_uri, image_size=SIZE, max_per_class=max_per_class,
            no_progress=True, tracking=False))

    assert [sorted(embed(cap).done) for cap in (None, 2)] == [["ant", "bee"]] * 2
    full = read_embeddings(root, PROBE_ID, "montecarlo", tasks)
    two = read_embeddings(root, PROBE_ID, "montecarlo", tasks, max_per_class=2)
    probe = build_probe("small_cnn", seed=0)
    for spec in tasks:
        np.testing.assert_allclose(full.row(spec.task_id), _library_vector(spec), rtol=1e-4,
                                   atol=1e-10)
        on_two = embed_task(spec, probe, EmbedConfig(image_size=SIZE, max_per_class=2))
        np.testing.assert_allclose(two.row(spec.task_id), on_two.vector, rtol=1e-4,
                                   atol=1e-10)
        assert not np.allclose(two.row(spec.task_id), full.row(spec.task_id))
    assert resolve_embedding_set(root) == (PROBE_ID, "montecarlo")  # still one set

    stored = {p: os.stat(root.join(p)).st_mtime_ns for p in root.list("embeddings", True)}
    for cap in (None, 2):
        again = embed(cap)
        assert again.done == [] and sorted(again.up_to_date) == ["ant", "bee"]
    assert {p: os.stat(root.join(p)).st_mtime_ns for p in root.list("embeddings", True)} \
        == stored


# -- the job -----------------------------------------------------------------------------------
def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        embed_tasks.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--root", "--probe", "--weights", "--method", "--num-gpus", "--batch",
                   "--max-samples", "--tasks", "--address", "--retry-failed"):
        assert option in text


def test_runtime_env_carries_aws_names_not_values_to_the_log(ray_local, moto_s3, caplog):
    caplog.set_level("INFO")
    env = worker_runtime_env()
    assert env["env_vars"]["AWS_ENDPOINT_URL"] == moto_s3.endpoint_url
    assert "AWS_SECRET_ACCESS_KEY" in caplog.text
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in caplog.text.replace(
        "AWS_SECRET_ACCESS_KEY", "")

    @ray_local.remote
    def endpoint() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    assert ray_local.get(endpoint.options(runtime_env=env).remote()) == moto_s3.endpoint_url
    assert worker_runtime_env(forward=False) is None


def test_s3_zoo_matches_library_and_reruns_do_only_whats_missing(
    ray_local, moto_s3, tmp_path, image_folder
):
    prefix = f"embed-{uuid.uuid4().hex[:8]}"
    local = tmp_path / "tasks"
    for i, name in enumerate(["ant", "bee", "cow"]):
        _task(local, image_folder, name, seed=i)
    data_uri = moto_s3.upload_tree(local, f"{prefix}/tasks")
    root_uri = f"s3://{moto_s3.bucket}/{prefix}/root"
    register_folders(data_uri, root_uri)
    root = StorageRoot(root_uri)

    first = embed_tasks.run(embed_tasks.parse_args(_args(root_uri, "--batch", "2")))
    assert sorted(first.done) == ["ant", "bee", "cow"] and not first.failed
    tasks = read_tasks(root)
    got = read_embeddings(root, PROBE_ID, "montecarlo", tasks)
    assert got.task_ids == ("ant", "bee", "cow") and got.vectors.dtype == np.float32
    for spec in tasks:
        np.testing.assert_allclose(got.row(spec.task_id), _library_vector(spec), rtol=1e-4,
                                   atol=1e-10)
    assert len(got.filter_names) == got.vectors.shape[1]
    rows = read_embedding_rows(root, PROBE_ID, "montecarlo")
    assert set(rows.column("probe").to_pylist()) == {PROBE_ID}
    assert json.loads(rows.column("config")[0].as_py())["image_size"] == SIZE

    # Re-running: nothing to do, no object written, same rows.
    objects = _s3_objects(moto_s3.client, moto_s3.bucket, f"{prefix}/root/")
    assert len([k for k in objects if "/part-" in k]) == 3  # one per task
    assert embed_tasks.main(_args(root_uri)) == 0
    assert _s3_objects(moto_s3.client, moto_s3.bucket, f"{prefix}/root/") == objects
    assert read_embedding_rows(root, PROBE_ID, "montecarlo").equals(rows)

    # A new task: only it is embedded.
    _task(local, image_folder, "dog", seed=7)
    moto_s3.upload_tree(local / "dog", f"{prefix}/tasks/dog")
    register_folders(data_uri, root_uri)
    added = embed_tasks.run(embed_tasks.parse_args(_args(root_uri)))
    assert added.done == ["dog"] and sorted(added.up_to_date) == ["ant", "bee", "cow"]

    # Changed data (new content hash): only that task, and reads pick the new row.
    old_bee = got.row("bee")
    image_folder(local, "bee", {"cat": 2}, None, seed=99, size=SIZE)  # overwrite two images
    moto_s3.upload_tree(local / "bee", f"{prefix}/tasks/bee")
    register_folders(data_uri, root_uri)
    changed = embed_tasks.run(embed_tasks.parse_args(_args(root_uri)))
    assert changed.done == ["bee"]
    tasks = read_tasks(root)
    current = read_embeddings(root, PROBE_ID, "montecarlo", tasks)
    newest = read_embeddings(root, PROBE_ID, "montecarlo")
    assert current.task_ids == newest.task_ids == ("ant", "bee", "cow", "dog")
    bee = next(s for s in tasks if s.task_id == "bee")
    np.testing.assert_allclose(newest.row("bee"), _library_vector(bee), rtol=1e-4, atol=1e-10)
    assert not np.allclose(newest.row("bee"), old_bee)
    assert _rows_per_task(root) == {"ant": 1, "bee": 2, "cow": 1, "dog": 1}

    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    for key in _s3_objects(moto_s3.client, moto_s3.bucket, f"{prefix}/root/"):
        body = moto_s3.client.get_object(Bucket=moto_s3.bucket, Key=key)["Body"].read()
        assert secret not in body


def test_task_with_only_corrupt_images_is_recorded_and_others_land(
    ray_local, tmp_path, image_folder, caplog
):
    caplog.set_level("INFO")
    local = tmp_path / "tasks"
    for i, name in enumerate(["good1", "good2", "broken"]):
        _task(local, image_folder, name, seed=10 + i)
    root_uri = str(tmp_path / "root")
    register_folders(str(local), root_uri)
    for png in (local / "broken" / "train").rglob("*.png"):
        png.write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # corrupted after registration

    assert embed_tasks.main(_args(root_uri, "--batch", "1")) == 3
    root = StorageRoot(root_uri)
    assert _rows_per_task(root) == {"good1": 1, "good2": 1}
    failures = read_failures(root, PROBE_ID, "montecarlo").to_pylist()
    assert [(f["task_id"], f["transient"]) for f in failures] == [("broken", False)]
    assert "no readable image" in failures[0]["error"]
    assert "failed broken:" in caplog.text and "no readable image" in caplog.text

    # A re-run skips the known-bad task (same content hash) and writes nothing.
    before = root.list("", recursive=True)
    caplog.clear()
    assert embed_tasks.main(_args(root_uri)) == 3
    assert root.list("", recursive=True) == before
    assert "skipped broken (failed before" in caplog.text
    retried = embed_tasks.run(embed_tasks.parse_args(_args(root_uri, "--retry-failed")))
    assert list(retried.failed) == ["broken"] and retried.done == []
    assert len(root.list(failures_path(PROBE_ID, "montecarlo"))) == 1  # same key, same part


class _MotoServer:
    """A moto server on a fixed port that really stops listening when stopped."""

    def __init__(self, port: int):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.endpoint = f"http://127.0.0.1:{port}"

    def start(self) -> _MotoServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()
        self.server._server.server_close()  # release the port: connections are refused


def test_s3_outage_mid_run_fails_clearly_and_rerun_loses_nothing(
    ray_local, moto_s3, tmp_path, image_folder, monkeypatch, caplog
):
    import boto3
    from moto.s3.models import S3Backend

    port = _free_port()
    server = _MotoServer(port).start()
    secret = "s3cr3t-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # fail fast instead of botocore's backoff
    bucket = f"t2v-outage-{uuid.uuid4().hex[:6]}"
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=bucket)
    local = tmp_path / "tasks"
    names = ["t1", "t2", "t3", "t4"]
    for i, name in enumerate(names):
        _task(local, image_folder, name, seed=20 + i)
    root_uri = f"s3://{bucket}/root"
    register_folders(str(local), root_uri)  # task data stays local; the root is on S3

    # Take S3 down as soon as the first embeddings part is stored: later writes are refused.
    original_put = S3Backend.put_object
    outage = threading.Event()

    def put_then_go_down(self, bucket_name, key_name, *args, **kwargs):
        result = original_put(self, bucket_name, key_name, *args, **kwargs)
        if bucket_name == bucket and "/part-" in key_name and not outage.is_set():
            outage.set()
            stopper = threading.Thread(target=server.stop)
            stopper.start()
            stopper.join(timeout=10)
        return result

    with monkeypatch.context() as patch:
        patch.setattr(S3Backend, "put_object", put_then_go_down)
        rc = embed_tasks.main(_args(root_uri, "--batch", "1", "--write-retries", "1"))
    assert outage.is_set() and rc == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(f"s3://{bucket}/root" in e and "cannot write embeddings" in e for e in errors)
    assert secret not in caplog.text
    caplog.clear()
    assert embed_tasks.main(_args(root_uri)) == 1  # still down: fails before any work
    assert f"cannot read the zoo manifest under s3://{bucket}/root" in caplog.text

    # The moto backend outlives its server: what was written before the outage is still there.
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint_url)
    landed = _rows_per_task(StorageRoot(root_uri))
    assert 1 <= sum(landed.values()) < len(names)

    server = _MotoServer(port).start()  # S3 is back, same address
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    summary = embed_tasks.run(embed_tasks.parse_args(_args(root_uri, "--batch", "1")))
    assert sorted(summary.done) == sorted(set(names) - set(landed))
    assert _rows_per_task(StorageRoot(root_uri)) == dict.fromkeys(names, 1)
    server.stop()


def test_worker_node_killed_mid_job_every_task_lands_once(tmp_path, image_folder):
    local = tmp_path / "tasks"
    names = [f"n{i}" for i in range(6)]
    for i, name in enumerate(names):
        # more images than elsewhere, so that a task lasts long enough to be interrupted
        image_folder(local, name, {"a": 30, "b": 30}, {"a": 1, "b": 1}, seed=40 + i, size=24)
    root_uri = str(tmp_path / "root")
    register_folders(str(local), root_uri)
    out = tmp_path / "result.json"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "_cluster_fault_script.py"), "--root", root_uri,
         "--out", str(out), "--probe-id", "small_cnn-random0", "--",
         "--probe", "small_cnn", "--image-size", "24", "--batch", "1", "--no-progress",
         "--max-retries", "5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = json.loads(out.read_text())
    assert report["n_tasks"] == len(names)
    assert 1 <= report["rows_at_kill"] < len(names), report  # the kill came mid-job
    assert report["rc_first"] == 0 or report.get("rc_rerun") == 0, report
    assert _rows_per_task(StorageRoot(root_uri)) == dict.fromkeys(names, 1)
