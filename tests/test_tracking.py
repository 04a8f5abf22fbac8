"""MLflow tracking: stage runs, safe params, tables, and the registered pyfunc recommender,
against a real ``mlflow server`` (sqlite backend, artifacts on the moto S3 server) and the
zero-configuration local sqlite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import running_mlflow_server
from mlflow.tracking import MlflowClient

from t2v_core import __version__
from t2v_core.embedding.synthetic_zoo import synthetic_zoo
from t2v_core.recommend.model2vec import Model2Vec
from t2v_core.review import plots, tracking
from t2v_core.review.recommender_model import (
    DEFAULT_NAME,
    load_recommender,
    recommendations_frame,
    register_recommender,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SECRET = "hunter2-do-not-log"
SERVER_PREFIX = "test-tracking/mlflow-artifacts"  # this module's own corner of the shared bucket


@pytest.fixture(autouse=True)
def _isolated_mlflow(monkeypatch):
    """Each test starts with MLflow unconfigured and leaves no run open or URI behind."""
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils
    import mlflow.tracking.fluent as fluent

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID",
                "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", tracking.PARENT_RUN_ENV,
                "RAY_JOB_ID", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture(scope="module")
def mlflow_server(moto_s3, tmp_path_factory):
    """This module's own real ``mlflow server``, so its artifacts sit under SERVER_PREFIX alone."""
    with running_mlflow_server(moto_s3, tmp_path_factory.mktemp("mlflow-server"),
                               SERVER_PREFIX) as url:
        yield url


@pytest.fixture(scope="module")
def zoo():
    return synthetic_zoo(n_clusters=3, tasks_per_cluster=5, experts_per_cluster=1, dim=16,
                         random_state=3)


@pytest.fixture(scope="module")
def model(zoo) -> Model2Vec:
    return Model2Vec(max_epochs=40, patience=10).fit(
        zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings, expert_ids=zoo.expert_ids
    )


def _s3_keys(moto_s3, prefix: str = "") -> list[str]:
    pages = moto_s3.client.get_paginator("list_objects_v2").paginate(
        Bucket=moto_s3.bucket, Prefix=prefix
    )
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _all_values(run) -> str:
    return json.dumps([run.data.params, run.data.tags])


# --------------------------------------------------------------------------- real server


def test_stage_run_on_server_logs_everything_to_s3(mlflow_server, moto_s3, zoo, model, tmp_path,
                                                   monkeypatch):
    monkeypatch.setenv("RAY_JOB_ID", "02000000")
    cfg = tracking.configure(tmp_path / "zoo", tracking_uri=mlflow_server, experiment="zoo-a")
    assert cfg.tracking_uri == mlflow_server and cfg.artifact_location is None
    assert "MLFLOW_TRACKING_URI" not in os.environ  # configure leaves the environment alone

    fig = plots.task_map(zoo.task_embeddings, zoo.families).figure
    recs = recommendations_frame(model, zoo.task_embeddings[:2], ["t0", "t1"], top_k=2)
    params = {"probe": "resnet18", "method": "montecarlo", "zoo_hash": "abc123",
              "AWS_SECRET_ACCESS_KEY": SECRET, "fisher": {"n_samples": 256}}
    with tracking.stage_run("embed_tasks", params, tags={"db_password": SECRET}) as run:
        tracking.log_task_counts(done=14, failed=1)
        tracking.log_metrics({"relative_increase_pct": np.float64(6.5), "note": "skipped"})
        tracking.log_figures({"task_map": fig})
        tracking.log_table(recs, "recommendations")
    assert mlflow.active_run() is None

    client = MlflowClient(mlflow_server)
    stage = client.get_run(run.info.run_id)
    assert stage.info.status == "FINISHED"
    assert stage.info.run_name.startswith("embed_tasks · zoo · ")
    assert stage.data.params["probe"] == "resnet18"
    assert stage.data.params["method"] == "montecarlo"
    assert stage.data.params["zoo_hash"] == "abc123"
    assert stage.data.params["fisher.n_samples"] == "256"
    assert stage.data.params["code_version"].startswith(__version__)
    assert "AWS_SECRET_ACCESS_KEY" not in stage.data.params and "db_password" not in stage.data.tags
    assert SECRET not in _all_values(stage)
    assert stage.data.metrics["tasks_done"] == 14 and stage.data.metrics["tasks_failed"] == 1
    assert stage.data.metrics["relative_increase_pct"] == 6.5 and "note" not in stage.data.metrics
    assert stage.data.metrics["wall_time_s"] > 0
    assert stage.data.tags["ray_job_id"] == "02000000"
    assert stage.data.tags["t2v.stage"] == "embed_tasks"
    assert stage.data.tags["t2v.zoo"] == "zoo" and stage.data.tags["t2v.root"] == str(tmp_path / "zoo")
    assert "mlflow.parentRunId" not in stage.data.tags  # a stage alone: no pipeline of one stage
    assert stage.info.experiment_id == cfg.experiment_id
    experiment = client.get_experiment(cfg.experiment_id)
    assert experiment.name == "zoo-a"
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING_KIND

    listed = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert listed == {"plots/task_map.png"}
    png = Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="plots/task_map.png", dst_path=str(tmp_path / "dl")))
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    table = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="tables/recommendations.json",
        dst_path=str(tmp_path / "dl"))).read_text())
    assert table["columns"][:4] == ["task_id", "rank", "expert_id", "score"]
    assert [row[:3] for row in table["data"]] == recs[["task_id", "rank", "expert_id"]].values.tolist()

    # The artifacts really went through the server to the S3 bucket.
    keys = _s3_keys(moto_s3, f"{SERVER_PREFIX}/")
    assert any(k.endswith(f"{run.info.run_id}/artifacts/plots/task_map.png") for k in keys)
    assert any(k.endswith(f"{run.info.run_id}/artifacts/tables/recommendations.json") for k in keys)


def test_registered_recommender_on_server_ranks_like_the_model(mlflow_server, moto_s3, zoo, model):
    tracking.configure(tracking_uri=mlflow_server, experiment="zoo-registry")
    with tracking.stage_run("train_model2vec", {"tau": model.tau_}) as run:
        first = register_recommender(model)
    second = register_recommender(model)  # a new training: a new version, in its own run
    assert (first, second) == (1, 2)

    client = MlflowClient(mlflow_server)
    assert client.get_model_version_by_alias(DEFAULT_NAME, "champion").version == "2"
    assert client.get_model_version(DEFAULT_NAME, "1").run_id == run.info.run_id

    new_tasks = zoo.task_embeddings[[0, 6, 12]].astype(np.float32)  # float32, as stored
    frame = pd.DataFrame({"task_id": ["a", "b", "c"], "embedding": [r.tolist() for r in new_tasks]})
    loaded = load_recommender(f"models:/{DEFAULT_NAME}@champion")
    got = loaded.predict(frame)
    assert list(got.columns) == ["task_id", "rank", "expert_id", "score", "distance"]
    n_experts = len(zoo.expert_ids)
    assert len(got) == 3 * n_experts
    expected_rank = model.rank(new_tasks)
    expected_scores = model.scores(new_tasks)
    for i, task in enumerate(["a", "b", "c"]):
        rows = got[got["task_id"] == task].sort_values("rank")
        assert rows["rank"].tolist() == list(range(1, n_experts + 1))
        assert rows["expert_id"].tolist() == [zoo.expert_ids[j] for j in expected_rank[i]]
        np.testing.assert_allclose(rows["score"], expected_scores[i, expected_rank[i]], rtol=1e-9)
    assert got.groupby("task_id")["score"].sum().round(9).eq(1.0).all()

    top2 = load_recommender(f"models:/{DEFAULT_NAME}/1").predict(
        frame[["embedding"]], params={"top_k": 2})
    assert top2["task_id"].tolist() == ["0", "0", "1", "1", "2", "2"]  # positions without ids
    assert top2["expert_id"].tolist()[::2] == [zoo.expert_ids[j] for j in expected_rank[:, 0]]

    model_keys = [k for k in _s3_keys(moto_s3, f"{SERVER_PREFIX}/") if k.endswith("model2vec.pt")]
    assert len(model_keys) == 2  # one artifact per registered version, on S3


# --------------------------------------------------------------------------- local default


def test_local_default_needs_no_configuration(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tracking.configure()
    db = tmp_path / "t2v-data" / "mlflow.db"
    assert cfg.tracking_uri == f"sqlite:///{db}"
    assert cfg.artifact_location == (tmp_path / "t2v-data" / "mlartifacts").as_uri()
    assert cfg.experiment_name == f"task2vec-zoo:{tmp_path / 't2v-data'}"
    with tracking.stage_run("register_zoo", {"n_tasks": 3}) as run:
        mlflow.log_text("hello", "notes/hello.txt")
    assert db.is_file()
    run_dir = tmp_path / "t2v-data" / "mlartifacts" / run.info.run_id
    assert (run_dir / "artifacts" / "notes" / "hello.txt").read_text() == "hello"
    stored = MlflowClient(f"sqlite:///{db}").get_run(run.info.run_id)
    assert stored.data.params["n_tasks"] == "3" and "wall_time_s" in stored.data.metrics


def test_local_recommender_round_trip(tmp_path, zoo, model):
    tracking.configure(tmp_path / "zoo")
    version = register_recommender(model, name="local-recommender", alias="staging")
    assert version == 1
    loaded = load_recommender("models:/local-recommender@staging")
    frame = pd.DataFrame({"embedding": [r.tolist() for r in zoo.task_embeddings[:4]]})
    got = loaded.predict(frame, params={"top_k": 1})
    assert got["expert_id"].tolist() == [zoo.expert_ids[j] for j in model.predict(zoo.task_embeddings[:4])]


def test_configure_switches_between_zoos(tmp_path):
    tracking.configure(tmp_path / "a")
    with tracking.stage_run("s"):
        pass
    cfg = tracking.configure(tmp_path / "b")  # not redirected to a's store by MLflow's env copy
    assert cfg.tracking_uri == f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    with tracking.stage_run("s") as run:
        pass
    assert (tmp_path / "b" / "mlflow.db").is_file()
    assert MlflowClient(cfg.tracking_uri).get_run(run.info.run_id).info.experiment_id == cfg.experiment_id


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    root = tmp_path / "zoo"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    env = tracking.resolve_tracking(root)
    assert env.tracking_uri == "http://127.0.0.1:9" and env.artifact_location is None
    explicit = tracking.resolve_tracking(root, tracking_uri=f"sqlite:///{tmp_path}/other.db")
    assert explicit.tracking_uri == f"sqlite:///{tmp_path}/other.db"
    assert explicit.artifact_location == (root / "mlartifacts").as_uri()


def test_s3_root_keeps_metadata_local_and_artifacts_on_s3(moto_s3, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = tracking.configure("s3://t2v-test/test-tracking/zoo-s3")
    assert cfg.tracking_uri == f"sqlite:///{tmp_path / 'home' / '.t2v' / 'mlflow.db'}"
    assert cfg.artifact_location == "s3://t2v-test/test-tracking/zoo-s3/mlartifacts"
    assert cfg.experiment_name == "task2vec-zoo:s3://t2v-test/test-tracking/zoo-s3"
    with tracking.stage_run("embed_tasks") as run:
        mlflow.log_text("x", "notes/x.txt")
    key = f"test-tracking/zoo-s3/mlartifacts/{run.info.run_id}/artifacts/notes/x.txt"
    assert key in _s3_keys(moto_s3, "test-tracking/zoo-s3/")


# --------------------------------------------------------------------------- runs and values


def test_failed_stage_ends_failed(tmp_path):
    tracking.configure(tmp_path / "zoo")
    with pytest.raises(ValueError, match="boom"), tracking.stage_run("fill_matrix") as run:
        raise ValueError("boom")
    client = MlflowClient(mlflow.get_tracking_uri())
    stage = client.get_run(run.info.run_id)
    assert stage.info.status == "FAILED" and "wall_time_s" in stage.data.metrics
    with pytest.raises(ValueError, match="boom"), tracking.pipeline_run("refresh") as parent:
        with tracking.stage_run("fill_matrix"):
            raise ValueError("boom")
    assert client.get_run(parent.info.run_id).info.status == "FAILED"


def _parent(client, run) -> str | None:
    return client.get_run(run.info.run_id).data.tags.get("mlflow.parentRunId")


def _runs(client, experiment_id, kind):
    return client.search_runs([experiment_id], f"tags.`t2v.kind` = '{kind}'")


def test_experiment_is_model_training_also_when_it_existed(tmp_path):
    root = tmp_path / "zoo"
    uri = tracking.resolve_tracking(root).tracking_uri
    name = tracking.default_experiment_name(root)
    old = MlflowClient(uri).create_experiment(  # made before, here even marked as GenAI
        name, tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    for _ in range(2):  # idempotent
        cfg = tracking.configure(root)
    assert cfg.experiment_id == old
    tags = MlflowClient(uri).get_experiment(old).tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING_KIND == "custom_model_development"
    assert tags["t2v.zoo"] == "zoo" and tags["t2v.root"] == str(root)
    fresh = tracking.configure(tmp_path / "other")
    assert MlflowClient(fresh.tracking_uri).get_experiment(fresh.experiment_id).tags[
        tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING_KIND


def test_stages_inside_one_pipeline_nest_under_it_in_process_and_in_subprocesses(tmp_path):
    root = tmp_path / "zoo"
    cfg = tracking.configure(root)
    client = MlflowClient(cfg.tracking_uri)
    stage_in_child = (
        "import sys; from t2v_core.review import tracking; tracking.configure(sys.argv[1]);\n"
        "with tracking.stage_run('fill_matrix'): pass")
    with tracking.pipeline_run("refresh", {"preset": "small"}) as parent:
        assert os.environ[tracking.PARENT_RUN_ENV] == parent.info.run_id
        with tracking.stage_run("embed_tasks") as a:
            pass
        subprocess.run([sys.executable, "-c", stage_in_child, str(root)], check=True,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])), timeout=120)
    assert tracking.PARENT_RUN_ENV not in os.environ  # only for the pipeline's duration
    assert _parent(client, a) == parent.info.run_id
    (child,) = client.search_runs([cfg.experiment_id], "tags.`t2v.stage` = 'fill_matrix'")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert [r.info.run_id for r in _runs(client, cfg.experiment_id, "pipeline")] == [parent.info.run_id]
    assert client.get_run(parent.info.run_id).info.run_name.startswith("refresh · zoo · ")


def test_parent_run_env_groups_stage_runs_of_separate_processes(tmp_path, monkeypatch):
    cfg = tracking.configure(tmp_path / "zoo")
    client = MlflowClient(cfg.tracking_uri)
    outside = client.create_run(cfg.experiment_id, run_name="refresh")  # another process's run
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, outside.info.run_id)
    with tracking.stage_run("embed_tasks") as a:  # one process ...
        pass
    with tracking.stage_run("fill_matrix") as b:  # ... and the next, with nothing active
        pass
    assert _parent(client, a) == _parent(client, b) == outside.info.run_id
    assert client.get_run(outside.info.run_id).info.status == "RUNNING"  # left to its owner
    assert len(_runs(client, cfg.experiment_id, "pipeline")) == 0  # no pipeline made up


def _submitted_as(monkeypatch, submission_id: str, job_id: str = "05000000") -> None:
    """The environment Ray's job supervisor gives an entrypoint (``ray job submit``)."""
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {}, "metadata": {"job_submission_id": submission_id,
                                         "job_name": submission_id}}))
    monkeypatch.setenv("RAY_JOB_ID", job_id)


def test_stages_of_one_ray_job_share_one_pipeline_and_a_stage_alone_has_none(tmp_path, monkeypatch):
    cfg = tracking.configure(tmp_path / "zoo")
    client = MlflowClient(cfg.tracking_uri)
    with tracking.stage_run("train_experts") as alone:  # by hand, outside Ray
        pass
    assert _parent(client, alone) is None

    _submitted_as(monkeypatch, "raysubmit_refresh1")
    with tracking.stage_run("embed_tasks") as a:
        pipeline_id = _parent(client, a)
        assert client.get_run(pipeline_id).info.status == "RUNNING"
    assert client.get_run(pipeline_id).info.status == "FINISHED"
    with pytest.raises(RuntimeError), tracking.stage_run("fill_matrix") as b:
        raise RuntimeError("out of memory")
    with tracking.stage_run("evaluate") as c:
        pass
    assert _parent(client, b) == _parent(client, c) == pipeline_id
    pipeline = client.get_run(pipeline_id)
    assert pipeline.info.status == "FAILED"  # one stage of the refresh failed
    assert pipeline.info.run_name.startswith("pipeline · zoo · ")
    assert pipeline.data.tags["ray_submission_id"] == "raysubmit_refresh1"
    stage = client.get_run(c.info.run_id)
    assert stage.data.tags["ray_job_id"] == "05000000"
    assert stage.data.tags["ray_submission_id"] == "raysubmit_refresh1"

    _submitted_as(monkeypatch, "raysubmit_refresh2")  # the next night's refresh
    with tracking.stage_run("embed_tasks") as d:
        pass
    assert _parent(client, d) not in (None, pipeline_id)
    assert len(_runs(client, cfg.experiment_id, "pipeline")) == 2


def test_run_names_and_tags_name_the_zoo_and_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = f"s3://AKIAEXAMPLE:{SECRET}@t2v-test/zoos/cifar"
    cfg = tracking.configure(root)
    with tracking.pipeline_run("refresh") as parent, tracking.stage_run("embed_tasks") as stage:
        pass
    client = MlflowClient(cfg.tracking_uri)
    experiment = client.get_experiment(cfg.experiment_id)
    for run_id, kind in ((parent.info.run_id, "refresh"), (stage.info.run_id, "embed_tasks")):
        run = client.get_run(run_id)
        name, zoo, when = run.info.run_name.split(" · ")
        assert (name, zoo) == (kind, "t2v-test/zoos/cifar") and when.endswith(" UTC")
        assert run.data.tags["t2v.zoo"] == "t2v-test/zoos/cifar"
        assert run.data.tags["t2v.root"] == "s3://t2v-test/zoos/cifar"
        assert SECRET not in _all_values(run) + run.info.run_name + run.info.artifact_uri
    assert client.get_run(stage.info.run_id).data.tags["t2v.stage"] == "embed_tasks"
    assert SECRET not in json.dumps([experiment.name, experiment.tags, experiment.artifact_location])
    assert tracking.zoo_name(tmp_path / "zoos" / "mnist") == "mnist"


def test_safe_params_drops_credentials():
    got = tracking.safe_params({
        "AWS_SECRET_ACCESS_KEY": SECRET, "aws_access_key_id": "AKIA", "api_token": SECRET,
        "DB_PASSWORD": SECRET, "storage": {"secret": SECRET, "root": "s3://user:pw@bucket/zoo"},
        "probe": "resnet34", "k": 5, "alpha": np.float32(0.25), "skip": None,
        "long": "x" * 7000, "ids": ["a", "b"],
    })
    assert got == {"probe": "resnet34", "k": "5", "alpha": "0.25", "storage.root": "s3://bucket/zoo",
                   "long": "x" * 5997 + "...", "ids": '["a", "b"]'}


def test_metric_names_are_sanitised():
    assert tracking.metric_name("table1/iNat+CUB/asym Task2Vec/regret@3") == \
        "table1/iNat_CUB/asym Task2Vec/regret_3"


def test_table1_metrics_flattens_an_evaluation_result():
    from t2v_core.recommend.metrics import MetaTaskScores
    from t2v_core.recommend.protocol import EvaluationResult, SelectorReport

    scores = MetaTaskScores(n_tasks=4, relative_increase_pct=6.81, top1_hit_rate=0.5,
                            regret_at_k_pct={1: 6.81, 3: 1.0}, kendall_tau=0.4,
                            weighted_tau=float("nan"))
    result = EvaluationResult(
        folds="loo", expert_ids=["e0"], families=["f"] * 4, meta_tasks={"Mixed": [0, 1, 2, 3]},
        reports={"model2vec": SelectorReport("model2vec", "Model2Vec", "one probe pass",
                                             {"Mixed": scores}, [], [])},
        expected_chance_pct={"Mixed": 100.0},
    )
    got = tracking.table1_metrics(result)
    assert got["table1/Mixed/model2vec/relative_increase_pct"] == pytest.approx(6.81)
    assert got["table1/Mixed/model2vec/regret_at_k_pct_3"] == 1.0
    assert got["table1/Mixed/model2vec/n_tasks"] == 4.0
    assert np.isnan(got["table1/Mixed/model2vec/weighted_tau"])


def test_ray_tags_and_code_version(monkeypatch):
    monkeypatch.setenv("RAY_JOB_ID", "03000000")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"metadata": {"job_submission_id": "raysubmit_abc"}}))
    assert tracking.ray_tags() == {"ray_job_id": "03000000", "ray_submission_id": "raysubmit_abc"}
    monkeypatch.setenv("T2V_GIT_SHA", "0123456789abcdef0123")
    tracking._git_sha.cache_clear()
    try:
        assert tracking.code_version() == f"{__version__}+g0123456789ab"
    finally:
        tracking._git_sha.cache_clear()


# --------------------------------------------------------------------------- a whole demo


def test_small_demo_against_the_server(mlflow_server, moto_s3, ray_local, tmp_path, monkeypatch):
    """Every stage of the demo leaves its run on the server, with plots downloadable from S3
    and a registered recommender that ranks like the one stored under the root."""
    from jobs import demo
    from t2v_core.recommend.meta_dataset import load_meta_dataset
    from t2v_core.recommend.model_store import load_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    root = tmp_path / "root"
    assert demo.main(["--root", str(root), "--small"]) == 0

    client = MlflowClient(mlflow_server)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="attributes.status = 'FINISHED'")
    # other tests of this module share the server: look only at the demo's own runs
    (pipeline,) = [r.info.run_id for r in runs if r.data.tags.get("t2v.pipeline") == "demo"]
    by_name = {r.data.tags["t2v.stage"]: r for r in runs
               if r.data.tags.get("mlflow.parentRunId") == pipeline}
    stages = ["train_experts", "embed_tasks", "fill_matrix", "train_model2vec", "evaluate",
              "data_efficiency"]
    assert set(stages) <= set(by_name)
    assert by_name["embed_tasks"].data.metrics["tasks_done"] == 12
    assert by_name["fill_matrix"].data.metrics["cells_ok"] > 0
    assert any(k.startswith("table1/") for k in by_name["evaluate"].data.metrics)

    evaluate_run = by_name["evaluate"].info.run_id
    plots = {a.path for a in client.list_artifacts(evaluate_run, "plots")}
    assert {"plots/task_map.png", "plots/error_matrix.png"} <= plots
    local = client.download_artifacts(evaluate_run, "plots/task_map.png", str(tmp_path))
    assert open(local, "rb").read(8) == PNG_SIGNATURE
    assert any(k.endswith("task_map.png") for k in _s3_keys(moto_s3, f"{SERVER_PREFIX}/"))

    stored, _ = load_model(root)
    data = load_meta_dataset(root)
    frame = pd.DataFrame({"task_id": list(data.task_ids),
                          "embedding": [r.astype(np.float32).tolist() for r in data.embeddings]})
    got = load_recommender(f"models:/{DEFAULT_NAME}@champion").predict(frame)
    expected = stored.rank(data.embeddings.astype(np.float32))
    for i, task in enumerate(data.task_ids):
        rows = got[got["task_id"] == task].sort_values("rank")
        assert rows["expert_id"].tolist() == [stored.expert_ids_[j] for j in expected[i]]
