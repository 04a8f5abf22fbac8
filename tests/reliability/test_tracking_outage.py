"""The MLflow server goes away while a job runs: the job's Parquet lands, the missing record is
reported in a warning within seconds (not after MLflow's minutes of retries), the job succeeds,
and a re-run once the server is back records itself and embeds nothing again."""

from __future__ import annotations

import contextlib
import http.server
import logging
import threading
import time

import pyarrow.dataset as ds
import pytest
from conftest import running_mlflow_server
from mlflow.tracking import MlflowClient

from jobs import embed_tasks
from t2v_core.review import tracking
from t2v_core.storage import StorageRoot
from t2v_core.zoo.register import register_folders

SIZE = 12
NAMES = ["ant", "bee", "cow", "dog"]


def _raw_rows(root: str) -> list[tuple[str, str]]:
    """(task_id, content_hash) of every embedding row on disk, as any Parquet reader sees it."""
    table = ds.dataset(f"{root}/embeddings", format="parquet", partitioning="hive").to_table(
        columns=["task_id", "content_hash"])
    return sorted(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))


def _stage_runs(url: str, stage: str) -> list:
    client = MlflowClient(url)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, filter_string=f"tags.`t2v.stage` = '{stage}'")


def test_unreachable_server_fails_fast_and_names_it():
    started = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable, match=r"http://127\.0\.0\.1:9 is unreach"):
        tracking.require_reachable("http://127.0.0.1:9")
    assert time.monotonic() - started < 10  # MLflow's own client would retry for minutes
    tracking.require_reachable("sqlite:///nowhere.db")  # not a server: nothing to probe


def test_any_http_answer_counts_as_up():
    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the handler's protocol)
            self.send_error(401)  # a server behind a login, or a proxy without /health

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            tracking.require_reachable(f"http://127.0.0.1:{server.server_port}")
        finally:
            server.shutdown()


@pytest.mark.slow
def test_server_stopped_mid_run_loses_no_results_and_a_rerun_records(
        ray_local, moto_s3, tmp_path, image_folder, monkeypatch, caplog):
    for i, name in enumerate(NAMES):
        image_folder(tmp_path / "tasks", name, {"cat": 4, "dog": 4}, {"cat": 1, "dog": 1},
                     seed=i, size=SIZE)
    root = str(tmp_path / "root")
    register_folders(str(tmp_path / "tasks"), root)
    workdir = tmp_path / "mlflow"
    workdir.mkdir()
    args = ["--root", root, "--probe", "small_cnn", "--image-size", str(SIZE), "--no-progress",
            "--batch", "1"]

    server = contextlib.ExitStack()
    url = server.enter_context(running_mlflow_server(moto_s3, workdir, "outage-artifacts"))
    tracking.require_reachable(url)
    stopped_at: list[float] = []
    write_part = StorageRoot.write_part

    def write_then_stop_the_server(self, *a, **k):  # the first embedding part lands, then
        written = write_part(self, *a, **k)         # the server goes away mid-run
        if not stopped_at and "embeddings" in str(a[0]):
            server.close()
            stopped_at.append(time.monotonic())
        return written

    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING):
        patch.setattr(StorageRoot, "write_part", write_then_stop_the_server)
        assert embed_tasks.main([*args, "--tracking-uri", url]) == 0
    ended = time.monotonic()
    assert stopped_at, "the server was never stopped"
    assert ended - stopped_at[0] < 90  # finished without waiting out MLflow's retries
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("could not log embed_tasks to MLflow" in w and f"{url} is unreachable" in w
               for w in warnings), warnings
    rows = _raw_rows(root)
    assert sorted(t for t, _ in rows) == NAMES  # every result landed, once

    with running_mlflow_server(moto_s3, workdir, "outage-artifacts") as back:
        assert _stage_runs(back, "embed_tasks") == []  # nothing half-recorded
        again = embed_tasks.run(embed_tasks.parse_args([*args, "--tracking-uri", back]))
        assert again.done == [] and sorted(again.up_to_date) == NAMES
        runs = _stage_runs(back, "embed_tasks")
        assert len(runs) == 1 and runs[0].data.metrics["tasks_up_to_date"] == len(NAMES)
        assert runs[0].info.status == "FINISHED"
    assert _raw_rows(root) == rows  # the re-run wrote nothing
