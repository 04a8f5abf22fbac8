"""Batch jobs leave an MLflow record when there is somewhere to put it, and only then."""

import argparse

import mlflow
import pytest

from jobs._cli import add_tracking_args, record_stage
from t2v_core.review import tracking


def _args(root, *argv):
    p = argparse.ArgumentParser()
    p.add_argument("--root")
    add_tracking_args(p)
    return p.parse_args(["--root", str(root), *argv])


def test_no_record_without_a_tracking_target(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    record_stage(_args(tmp_path), "embed_tasks", {"probe": "p"}, {"tasks_done": 3})
    assert not (tmp_path / "mlflow.db").exists()


def test_stage_nests_under_the_pipeline_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.configure(tmp_path)
    with tracking.pipeline_run("demo") as parent:
        record_stage(_args(tmp_path), "embed_tasks", {"probe": "p"},
                     {"tasks_done": 3, "tasks_failed": 1})
        record_stage(_args(tmp_path, "--no-tracking"), "fill_matrix", {}, {"cells_ok": 1})
    runs = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert list(runs["tags.t2v.stage"]) == ["embed_tasks"]
    assert runs.iloc[0]["metrics.tasks_done"] == 3 and runs.iloc[0]["params.probe"] == "p"


def test_explicit_uri_records_and_broken_tracking_does_not_fail_the_job(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/explicit.db"
    record_stage(_args(tmp_path, "--tracking-uri", uri), "fill_matrix", {}, {"cells_ok": 2})
    assert (tmp_path / "explicit.db").exists()
    (tmp_path / "a-file").write_text("not a directory")
    record_stage(_args(tmp_path, "--tracking-uri", f"sqlite:///{tmp_path}/a-file/x.db"),
                 "fill_matrix", {}, {"cells_ok": 2})
    assert "could not log fill_matrix" in caplog.text


@pytest.fixture(autouse=True)
def _no_active_run():
    yield
    while mlflow.active_run():
        mlflow.end_run()
