"""The refresh as a cluster runs it: ``ray job submit`` of ``python -m jobs.refresh_zoo`` to a
real head on 127.0.0.1, with the runtime_env of cluster/runtime_env.yaml (working_dir ".", its
excludes) and the moto S3 and MLflow server variables passed by name through
cluster/runtime_env.py, an ``s3://`` root and the task folders on the moto server, runs and
models in a real ``mlflow server``.

Submitted three times: the first refresh does everything and sets the champion; after one more
task folder is uploaded, the second embeds and fills only that task; the third is up to date.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from mlflow.tracking import MlflowClient
from ray_cluster import REPO, VENV_BIN, Head, running_ray_head
from test_refresh_zoo import ARGS, NAME, PROBE_ID, STAGES, write_task, write_zoo

from t2v_core.embedding.store import dataset_path, read_embedding_rows
from t2v_core.matrix.rows import read_matrix
from t2v_core.review import tracking
from t2v_core.storage import StorageRoot
from t2v_core.zoo.manifest import read_tasks


@pytest.fixture(scope="module")
def ray_head():
    yield from running_ray_head()


PASSED = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI")


def _runtime_env(head: Head, moto_s3, mlflow_server: str) -> str:
    """cluster/runtime_env.yaml as JSON, with the test's S3 and MLflow variables passed in."""
    env = {**head.env, "AWS_ENDPOINT_URL": moto_s3.endpoint_url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "MLFLOW_TRACKING_URI": mlflow_server}
    passed = [arg for name in PASSED for arg in ("--pass", name)]
    return subprocess.run([sys.executable, "cluster/runtime_env.py", *passed], cwd=REPO, env=env,
                          capture_output=True, text=True, check=True).stdout


def _refresh(head: Head, runtime_env: str, *args: str) -> str:
    """Submit one refresh from the repository root and wait for it; returns its logs."""
    done = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", head.address,
         "--runtime-env-json", runtime_env, "--", "python", "-m", "jobs.refresh_zoo", *args],
        env=head.env, cwd=REPO, capture_output=True, text=True, timeout=900)
    logs = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in logs, logs[-6000:]
    return logs


def _s3_objects(moto_s3, prefix: str) -> dict[str, str]:
    pages = moto_s3.client.get_paginator("list_objects_v2").paginate(
        Bucket=moto_s3.bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


@pytest.mark.slow
def test_refresh_submitted_three_times(ray_head, moto_s3, mlflow_server, tmp_path,
                                       write_task_folder):
    prefix = f"refresh-submit-{uuid.uuid4().hex[:8]}"
    local = write_zoo(tmp_path / "tasks", write_task_folder)
    folders = moto_s3.upload_tree(local, f"{prefix}/tasks")
    root_uri = f"s3://{moto_s3.bucket}/{prefix}/zoo"
    root, args = StorageRoot(root_uri), ["--root", root_uri, "--folders", folders, *ARGS]
    runtime_env = _runtime_env(ray_head, moto_s3, mlflow_server)

    logs = _refresh(ray_head, runtime_env, *args)
    assert "refreshed" in logs and "3 task(s) registered" in logs
    assert len(read_tasks(root)) == 3
    assert read_embedding_rows(root, PROBE_ID, "montecarlo").num_rows == 3
    rows_before = {(r["task_id"], r["expert_id"]): r["test_error"]
                   for r in read_matrix(root, mode="probe").to_pylist()}
    assert len(rows_before) == 9
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(tracking.default_experiment_name(root_uri))
    [pipeline] = client.search_runs([experiment.experiment_id], "tags.`t2v.kind` = 'pipeline'")
    assert pipeline.info.status == "FINISHED" and "ray_submission_id" in pipeline.data.tags
    stages = client.search_runs([experiment.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{pipeline.info.run_id}'")
    assert {r.data.tags["t2v.stage"] for r in stages} == STAGES
    assert client.get_registered_model(NAME).aliases == {"champion": "1"}

    embeddings = f"{prefix}/zoo/{dataset_path(PROBE_ID, 'montecarlo')}/"
    parts_before = _s3_objects(moto_s3, embeddings)
    write_task(tmp_path / "more", write_task_folder, "a-three", ("x", "y"), seed=7)
    moto_s3.upload_tree(tmp_path / "more", f"{prefix}/tasks")
    logs = _refresh(ray_head, runtime_env, *args)
    assert "1 task(s) registered, 0 expert(s) trained, 1 embedded, 3 cell(s) filled" in logs
    parts_after = _s3_objects(moto_s3, embeddings)
    assert parts_after.items() > parts_before.items() and len(parts_after) == 4
    rows = {(r["task_id"], r["expert_id"]): r["test_error"]
            for r in read_matrix(root, mode="probe").to_pylist()}
    assert {k: rows[k] for k in rows_before} == rows_before
    assert set(rows) - set(rows_before) == {("a-three", e) for _, e in rows_before}
    assert client.get_registered_model(NAME).aliases == {"champion": "2"}

    logs = _refresh(ray_head, runtime_env, *args)
    assert "is up to date" in logs and "refreshed" not in logs
    assert _s3_objects(moto_s3, embeddings) == parts_after
