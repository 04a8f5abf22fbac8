"""Jobs under ``ray job submit``, against a real head (``ray start --head`` on 127.0.0.1):

* a relative ``--root`` would land in Ray's temporary copy of the working_dir and vanish with
  it: the job fails and says what to pass; an absolute root works and keeps its results;
* the submitting shell's environment does not reach the job; ``--runtime-env-json
  '{"env_vars": ...}'`` does, for the driver and for its workers, and the jobs' own
  forwarding of AWS_*/MLFLOW_* to the workers does not collide with it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from ray_cluster import REPO, VENV_BIN, Head, running_ray_head

from jobs._ray_util import checked_root, worker_runtime_env


@pytest.fixture(scope="module")
def ray_head():
    yield from running_ray_head()


ENTRYPOINTS = Path(__file__).resolve().parent / "submitted"


# -- checked_root without a cluster -----------------------------------------------------------
def test_checked_root_leaves_ordinary_roots_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    for root in ("./t2v-data", str(tmp_path), "s3://bucket/zoo", f"file://{tmp_path}"):
        assert checked_root(root) == root


def test_checked_root_refuses_ray_working_dir_copies(tmp_path, monkeypatch):
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab12"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    for root in ("./t2v-data", str(copy / "out"), f"file://{copy}/out"):
        with pytest.raises(argparse.ArgumentTypeError, match="s3://bucket/prefix") as err:
            checked_root(root)
        assert "temporary copy of the job's working_dir" in str(err.value)
    # In a submitted job a relative root is refused wherever Ray started it.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}}))
    with pytest.raises(argparse.ArgumentTypeError, match="directory Ray started this job in"):
        checked_root("t2v-data")
    assert checked_root(str(tmp_path / "t2v-data")) == str(tmp_path / "t2v-data")


# -- a real head (the ray_head fixture of ray_cluster.py) -------------------------------------
def _submit(head: Head, script: str, *args: str, env_vars: dict | None = None):
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", head.address,
           "--working-dir", str(ENTRYPOINTS)]
    if env_vars:
        cmd += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
    cmd += ["--", "python", script, *args]
    return subprocess.run(cmd, env=head.env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_submitted_job_refuses_a_relative_root(ray_head, tmp_path):
    refused = _submit(ray_head, "root_probe.py", "--root", "./t2v-data")
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0, out
    assert "runtime_resources/working_dir_files" in out and "s3://bucket/prefix" in out, out
    assert "marker written" not in out

    root = tmp_path / "shared" / "t2v-data"
    kept = _submit(ray_head, "root_probe.py", "--root", str(root))
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert (root / "probe" / "marker.txt").read_bytes() == b"ok"


@pytest.mark.slow
def test_env_vars_of_the_submission_reach_driver_and_workers(ray_head, moto_s3):
    env_vars = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                           "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    prefix = f"submit-env-{time.time_ns()}"
    root = f"s3://{moto_s3.bucket}/{prefix}"
    done = _submit(ray_head, "env_probe.py", root, env_vars=env_vars)
    assert done.returncode == 0, done.stdout + done.stderr
    listed = moto_s3.client.list_objects_v2(Bucket=moto_s3.bucket, Prefix=prefix)
    keys = sorted(o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", []))
    assert keys == ["driver.txt", "job_worker.txt", "task.txt"]
    for key in keys:
        body = moto_s3.client.get_object(Bucket=moto_s3.bucket, Key=f"{prefix}/{key}")["Body"]
        assert body.read().decode() == moto_s3.endpoint_url


def test_worker_env_leaves_out_what_the_submitted_job_already_sets(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-submission")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip",
                           "env_vars": {"AWS_ACCESS_KEY_ID": "from-submission"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    env = worker_runtime_env()["env_vars"]
    assert "AWS_ACCESS_KEY_ID" not in env
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert worker_runtime_env()["env_vars"]["AWS_ACCESS_KEY_ID"] == "from-submission"
