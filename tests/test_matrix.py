"""The performance matrix: cells planned, trained and combined into rows by the core, filled
through Ray Tune into Parquet (local and moto S3), skipped when present, resumed after an
interruption, failed with a reason when training diverges, and the feature cache reused
across trials."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from t2v_core.embedding.probes import build_probe, save_weights
from t2v_core.matrix.cells import (
    CellOutcome,
    CellUnit,
    FillConfig,
    cell_key,
    combine,
    plan_cells,
    plan_trials,
    train_unit,
)
from t2v_core.matrix.finetune import (
    FinetuneRecipe,
    HeadConfig,
    ImageProblem,
    ProbeRecipe,
    TrainResult,
    fit_network,
)
from t2v_core.matrix.rows import (
    KEY_COLUMNS,
    MATRIX_DIR,
    MatrixRow,
    compact,
    done_cells,
    missing_cells,
    part_for,
    pivot,
    read_matrix,
    write_rows,
    written,
)
from t2v_core.storage import StorageRoot
from t2v_core.zoo.data import DataError, load_split, scan_task
from t2v_core.zoo.manifest import ExpertSpec, TaskSpec, upsert_experts, upsert_tasks

REPO = Path(__file__).resolve().parents[1]
SIZE = 16
TASKS = [  # name, kind, classes, seed
    ("orient-a", "orient", 4, 1),
    ("orient-b", "orient", 3, 2),
    ("colour-a", "colour", 3, 3),
    ("colour-b", "colour", 4, 4),
    ("spot-a", "spot", 4, 5),
    ("spot-b", "spot", 2, 6),
]


# -- a tiny zoo whose classes are learnable -------------------------------------------------
def _image(kind: str, label: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Oriented gratings, flat colours or a blob in one quadrant, plus noise: a network
    trained on the gratings sees orientation far better than a random one."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    if kind == "orient":
        theta = np.pi * label / n_classes + rng.normal(0, 0.08)
        wave = np.sin(2 * np.pi * rng.uniform(2.5, 4.0) * (np.cos(theta) * xx + np.sin(theta) * yy)
                      + rng.uniform(0, 2 * np.pi))
        img = 0.5 + 0.35 * wave[..., None] * rng.uniform(0.3, 1.0, 3)
    elif kind == "colour":
        base = np.eye(3)[label % 3] * 0.5 + 0.25 + (label // 3) * 0.15
        img = np.broadcast_to(base, (SIZE, SIZE, 3)).copy()
    else:
        cy, cx = [(0.3, 0.3), (0.3, 0.7), (0.7, 0.3), (0.7, 0.7)][label]
        blob = np.exp(-((yy - cy - rng.normal(0, 0.05)) ** 2 + (xx - cx - rng.normal(0, 0.05)) ** 2)
                      / 0.02)
        img = 0.2 + 0.6 * blob[..., None] * rng.uniform(0.5, 1, 3)
    img = img + rng.normal(0, 0.15, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_task(base: Path, name: str, kind: str, n_classes: int, seed: int,
               n_train: int = 12, n_test: int = 8) -> Path:
    task = base / name
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(n_classes):
            (task / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng(zlib.crc32(f"{seed}/{split}/{c}/{i}".encode()))
                Image.fromarray(_image(kind, c, n_classes, rng)).save(task / split / f"c{c}" / f"{i}.png")
    return task


@pytest.fixture(scope="module")
def zoo_files(tmp_path_factory):
    """Task folders and expert weights on local disk: two random small CNNs, one trained on
    orient-a (a few SGD epochs of network + linear head), and one with NaN weights."""
    base = tmp_path_factory.mktemp("zoo")
    for name, kind, n, seed in TASKS:
        write_task(base / "tasks", name, kind, n, seed)
    weights = base / "weights"
    weights.mkdir()
    for s in (0, 1):
        save_weights(build_probe("small_cnn", seed=s, input_size=SIZE).backbone,
                     str(weights / f"random{s}.pt"))
    spec, _ = scan_task(str(base / "tasks" / "orient-a"))
    x, y = load_split(spec, "train", SIZE)
    xt, yt = load_split(spec, "test", SIZE)
    problem = ImageProblem.with_validation(x, y, xt, yt, spec.n_classes, 0.0)
    out = fit_network(build_probe("small_cnn", seed=0, input_size=SIZE).backbone, problem,
                      HeadConfig(0.05, 5e-4), FinetuneRecipe(epochs=10, batch_size=16))
    assert out.result.ok
    save_weights(out.model[0], str(weights / "orient-a-expert.pt"))
    broken = build_probe("small_cnn", seed=2, input_size=SIZE).backbone
    with torch.no_grad():
        broken.features[0].weight[0, 0, 0, 0] = float("nan")
    save_weights(broken, str(weights / "nan.pt"))
    return base


def register(root_uri: str, tasks_uri: str, weights_uri: str, nan_expert: bool = False):
    from t2v_core.embedding.probes import load_state_dict, weights_digest

    specs = [scan_task(f"{tasks_uri}/{name}")[0] for name, *_ in TASKS]
    upsert_tasks(root_uri, specs)
    experts = [("random0", None), ("random1", None), ("orient-a-expert", "orient-a")]
    if nan_expert:
        experts.append(("nan", None))
    specs_e = []
    for eid, source in experts:
        uri = f"{weights_uri}/{eid}.pt"
        specs_e.append(ExpertSpec(eid, "small_cnn", uri, source,
                                  weights_digest(load_state_dict(uri))))
    upsert_experts(root_uri, specs_e)
    return specs, specs_e


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return env


def run_job(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.fill_matrix", *args], cwd=REPO,
                          env=_env(), capture_output=True, text=True, **kw)


def raw_rows(root: StorageRoot) -> list[dict]:
    return read_matrix(root, dedup=False).to_pylist()


# -- matrix I/O (no Ray) --------------------------------------------------------------------
def _row(task: str, expert: str, err: float | None = 0.1, status: str = "ok", th: str = "t",
         eh: str = "e") -> MatrixRow:
    return MatrixRow(task, expert, "probe", status, err, err, 10, 5, 2, 0.5, th, eh,
                     {"hp": {"lr": 0.01}}, None if status == "ok" else "diverged")


def _spec(tid: str, h: str = "t") -> TaskSpec:
    return TaskSpec(tid, "f", "/x", "imagefolder", ("a", "b"), 4, 2, h)


def _expert(eid: str, h: str = "e") -> ExpertSpec:
    return ExpertSpec(eid, "small_cnn", "/w", None, h)


def test_rows_roundtrip_dedup_pivot_and_compact(tmp_path):
    root = StorageRoot(tmp_path)
    assert read_matrix(root).num_rows == 0
    first = write_rows(root, [_row("t1", "e1", 0.2), _row("t2", "e1", 0.4)])
    assert write_rows(root, [_row("t2", "e1", 0.4), _row("t1", "e1", 0.2)]) == first
    write_rows(root, [_row("t1", "e2", None, status="failed")])
    write_rows(root, [_row("t1", "e2", 0.3)])  # a later success for the same cell
    write_rows(root, [_row("t2", "e2", 0.5, th="old")])  # computed for an old task version
    table = read_matrix(root, tasks=[_spec("t1"), _spec("t2")],
                        experts=[_expert("e1"), _expert("e2")])
    keys = [tuple(r[k] for k in KEY_COLUMNS) for r in table.to_pylist()]
    assert len(keys) == len(set(keys)) == 3
    arr, tids, eids = pivot(table)
    assert (tids, eids) == (["t1", "t2"], ["e1", "e2"])
    np.testing.assert_allclose(arr, [[0.2, 0.3], [0.4, np.nan]])
    done = done_cells(root, [_spec("t1"), _spec("t2")], [_expert("e1"), _expert("e2")], "probe")
    assert done == {("t1", "e1"), ("t2", "e1"), ("t1", "e2")}
    assert json.loads(table.to_pylist()[0]["config"])["hp"] == {"lr": 0.01}
    assert part_for([("t2", "e1", "probe"), ("t1", "e1", "probe")]) == first
    assert written(root, [_spec("t1"), _spec("t2")], _expert("e1"), "probe")
    assert not written(root, [_spec("t1"), _spec("t2", "new")], _expert("e1"), "probe")
    assert not written(root, [_spec("t1")], _expert("e1"), "probe")
    assert compact(root) is not None
    assert len(root.list(MATRIX_DIR)) == 1
    assert read_matrix(root).num_rows == 4  # stale-hash row kept; readers filter it by spec


def test_shards_partition_the_cells():
    tasks = [_spec(f"t{i}") for i in range(20)]
    experts = [_expert(f"e{j}") for j in range(7)]
    every = missing_cells(tasks, experts, set())
    assert len(every) == 140
    shards = [missing_cells(tasks, experts, set(), shard=(i, 3)) for i in range(3)]
    keys = [{(t.task_id, e.expert_id) for t, e in s} for s in shards]
    assert sum(map(len, keys)) == 140 and set().union(*keys) == {(t.task_id, e.expert_id)
                                                                 for t, e in every}
    done = {("t0", "e0")}
    assert len(missing_cells(tasks, experts, done)) == 139


# -- cells: plan, train, combine (no Ray) ---------------------------------------------------
def test_plan_cells_takes_only_cells_without_rows(tmp_path):
    fill = FillConfig(root=str(tmp_path), num_samples=3, seed=5)
    tasks, experts = [_spec(f"t{i}") for i in range(3)], [_expert("e1"), _expert("e2")]
    write_rows(fill.storage(), [_row("t0", "e1"), _row("t2", "e2", None, status="failed")])
    requested = missing_cells(tasks, experts, set())
    plan = plan_cells(fill, requested)
    assert [cell_key(*c) for c in plan.todo] == [("t1", "e1"), ("t2", "e1"), ("t0", "e2"),
                                                  ("t1", "e2")]
    assert (len(plan.requested), plan.already_done) == (6, 2)
    retry = plan_cells(fill, requested, retry_failed=True, skip={("t1", "e1")}, max_cells=2)
    assert [cell_key(*c) for c in retry.todo] == [("t2", "e1"), ("t0", "e2")]
    assert retry.already_done == 2


def test_plan_trials_groups_cells_by_expert_at_the_architecture_size(tmp_path):
    cells = [(_spec(t), _expert("e1")) for t in ("t1", "t2", "t3")]
    cells.append((_spec("t1"), ExpertSpec("big", "resnet34", "/w", None, "e")))
    batched = plan_trials(cells, FillConfig(root=str(tmp_path), num_samples=3), cells_per_trial=2)
    assert [(u.expert.expert_id, [t.task_id for t in u.tasks], u.image_size)
            for u in batched.units] == [("e1", ["t1", "t2"], 32), ("e1", ["t3"], 32),
                                        ("big", ["t1"], 224)]
    assert len(batched.config_lists) == 1 and len(batched.config_lists[0]) == 3
    assert set(batched.expected.values()) == {1} and batched.n_trials == 3
    fill = FillConfig(root=str(tmp_path), num_samples=3, image_size=16, layout="trial")
    trial = plan_trials(cells, fill)
    assert [u.image_size for u in trial.units] == [16] * 4
    assert [list(c) for c in trial.config_lists] == [[c] for c in fill.configs()]
    assert set(trial.expected.values()) == {3} and trial.n_trials == 12
    # what a Tune trial receives: plain values, the same settings and cells once rebuilt
    for settings in (fill, FillConfig(root=str(tmp_path), recipe=FinetuneRecipe(epochs=2))):
        assert FillConfig.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    assert [CellUnit.from_dict(json.loads(json.dumps(u.to_dict()))) for u in trial.units] == list(
        trial.units)


def _outcome(val_error, test_error, lr, *, diverged=0, status="ok", task="t1") -> CellOutcome:
    failed = status != "ok"
    result = TrainResult(status, None if failed else test_error, None if failed else 0.05,
                         None if failed else val_error, None if failed else 0.1,
                         None if failed else 0.2, 7, 1.5, 40, 10, {"lr": lr},
                         "loss is nan at step 3" if failed else None, 24)
    return CellOutcome(task, "e1", "t", "e", result, {} if failed else {"lr": lr},
                       2, diverged, 1.5, "cpu", "small_cnn-abc")


def test_combine_keeps_the_best_on_validation_and_the_recipe(tmp_path):
    fill = FillConfig(root=str(tmp_path), recipe=ProbeRecipe(epochs=7, seed=3), num_samples=4,
                      seed=3, max_per_class=5, layout="trial")
    outcomes = [_outcome(0.3, 0.1, 0.1), _outcome(0.2, 0.4, 0.01),
                _outcome(None, None, 1.0, status="failed")]
    row = combine(outcomes, fill)
    assert (row.status, row.test_error, row.trials, row.gpu_seconds) == ("ok", 0.4, 6, 4.5)
    assert (row.n_train, row.epochs, row.max_per_class, row.error) == (40, 7, 5, None)
    assert row.config["hp"] == {"lr": 0.01} and row.config["val_error"] == 0.2
    assert row.config["recipe"] == {"mode": "probe", "version": 1, "epochs": 7, "hidden": 0,
                                    "seed": 3, "explode_factor": 100.0}
    assert row.config["data"] == {"max_per_class": 5, "max_test_per_class": None,
                                  "val_fraction": 0.2, "seed": 3, "image_size": None}
    assert row.config["search"] == {"lr": [1e-3, 1e-1], "weight_decay": [1e-6, 1e-2],
                                    "num_samples": 4, "seed": 3}
    assert (row.config["layout"], row.config["n_test"], row.config["configs_tried"]) == (
        "trial", 24, 6)
    # outcomes travel between processes as JSON
    sent = [CellOutcome.from_dict(json.loads(json.dumps(o.to_dict()))) for o in outcomes]
    assert sent == outcomes


def test_combine_failed_outcomes_into_a_row_that_says_why(tmp_path):
    fill = FillConfig(root=str(tmp_path))
    diverged = combine([_outcome(None, None, 0.1, status="failed", diverged=2)] * 2, fill)
    assert (diverged.status, diverged.test_error, diverged.config["hp"]) == ("failed", None, {})
    assert diverged.error == "all 4 configurations diverged; first: loss is nan at step 3"
    unreadable = CellOutcome.input_failure(_spec("t1"), _expert("e1"),
                                           DataError("no test split"), 4, "cpu")
    row = combine([unreadable], fill)
    assert (row.status, row.trials) == ("failed", 4)
    assert row.error == "input error: DataError: no test split"
    write_rows(fill.storage(), [row])
    (stored,) = read_matrix(fill.storage()).to_pylist()
    assert (stored["status"], stored["error"]) == ("failed", row.error)


def test_train_unit_caches_features_and_fails_cells_with_unusable_weights(zoo_files, tmp_path):
    root_uri = str(tmp_path / "root")
    tasks, experts = register(root_uri, str(zoo_files / "tasks"), str(zoo_files / "weights"))
    fill = FillConfig(root=root_uri, num_samples=2, image_size=SIZE)
    unit = CellUnit(experts[0], tuple(tasks[:2]), SIZE)
    first = train_unit(fill, unit, fill.configs())
    assert (first.feature_misses, first.feature_hits) == (4, 0)
    assert [o.key for o in first.outcomes] == unit.keys()
    assert all(o.result.ok and o.configs_tried == 2 and o.hp for o in first.outcomes)
    again = train_unit(fill, unit, fill.configs())
    assert (again.feature_misses, again.feature_hits) == (0, 4)
    assert [o.result.test_error for o in again.outcomes] == [o.result.test_error
                                                             for o in first.outcomes]
    (tmp_path / "junk.pt").write_bytes(b"not weights")
    junk = ExpertSpec("junk", "small_cnn", str(tmp_path / "junk.pt"), None, "h")
    (bad,) = train_unit(fill, CellUnit(junk, (tasks[0],), SIZE), fill.configs()).outcomes
    assert not bad.result.ok and bad.result.error.startswith("input error: WeightsError")


def test_progress_counts_the_cells_an_interrupted_run_wrote(tmp_path):
    """A restored experiment's writer (unpickled from Tune's state) starts its bar at the
    cells already written, of all the experiment's cells, and never rewrites them."""
    from jobs.fill_matrix import MatrixWriter

    fill = FillConfig(root=str(tmp_path))
    grid = plan_trials([(_spec(t), _expert("e1")) for t in ("t1", "t2", "t3", "t4")], fill, 1)
    writer = pickle.loads(pickle.dumps(MatrixWriter(fill, grid, progress=True)))
    first = write_rows(fill.storage(), [_row("t1", "e1")])
    write_rows(fill.storage(), [_row("t3", "e1", None, status="failed")])
    writer.setup()
    try:
        assert (writer.bar.total, writer.bar.n) == (4, 2)
        mtime = os.stat(fill.storage().join(first)).st_mtime_ns
        assert writer.rows.add([_outcome(0.2, 0.3, 0.1, task="t1")]) == []
        assert os.stat(fill.storage().join(first)).st_mtime_ns == mtime
        assert writer.rows.add([_outcome(0.2, 0.3, 0.1, task="t2")]) == [("t2", "e1")]
        writer.rows.mark([("t4", "e1")])  # a trial that found its rows written
        assert writer.bar.n == 4
    finally:
        writer.on_experiment_end([])
    rows = {r["task_id"]: r for r in read_matrix(fill.storage()).to_pylist()}
    assert sorted(rows) == ["t1", "t2", "t3"] and rows["t2"]["test_error"] == 0.3


def test_help():
    out = run_job(["--help"], timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--shard", "--num-samples", "--mode", "--max-cells", "--tasks", "--experts"):
        assert flag in out.stdout


# -- through Ray Tune -----------------------------------------------------------------------
def test_fill_on_s3_every_cell_once_and_the_trained_expert_wins(zoo_files, moto_s3, ray_local):
    prefix = f"matrix-{uuid.uuid4().hex[:8]}"
    tasks_uri = moto_s3.upload_tree(zoo_files / "tasks", f"{prefix}/tasks")
    weights_uri = moto_s3.upload_tree(zoo_files / "weights", f"{prefix}/weights")
    root_uri = f"s3://{moto_s3.bucket}/{prefix}/root"
    tasks, experts = register(root_uri, tasks_uri, weights_uri, nan_expert=True)
    summary_path = zoo_files / f"{prefix}.json"
    address = ray_local.get_runtime_context().gcs_address
    args = ["--root", root_uri, "--address", address, "--image-size", str(SIZE),
            "--num-samples", "3", "--no-progress", "--summary-json", str(summary_path)]
    out = run_job(args, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["cells_ok"] == 18 and summary["cells_failed"] == 6
    assert summary["feature_misses"] == 2 * 24 and summary["trials_run"] == 4

    root = StorageRoot(root_uri)
    rows = raw_rows(root)
    keys = [(r["task_id"], r["expert_id"]) for r in rows]
    assert len(keys) == len(set(keys)) == 24  # every cell exactly once
    for r in rows:
        cfg = json.loads(r["config"])
        if r["expert_id"] == "nan":
            assert r["status"] == "failed" and "diverged" in r["error"], r
            assert r["test_error"] is None and cfg["diverged"] == 3
            continue
        assert r["status"] == "ok", r
        assert 0.0 <= r["test_error"] <= 1.0 and 0.0 <= r["train_error"] <= 1.0
        assert r["trials"] == 3 and r["gpu_seconds"] > 0
        assert set(cfg["hp"]) == {"lr", "weight_decay"} and cfg["recipe"]["mode"] == "probe"
        assert cfg["n_test"] == next(t.n_test for t in tasks if t.task_id == r["task_id"])
    table = read_matrix(root, mode="probe", tasks=tasks, experts=experts)
    arr, tids, eids = pivot(table, [t.task_id for t in tasks], [e.expert_id for e in experts])
    assert arr.shape == (6, 4) and np.isnan(arr[:, eids.index("nan")]).all()
    i = tids.index("orient-a")
    trained = arr[i, eids.index("orient-a-expert")]
    assert trained < arr[i, eids.index("random0")] and trained < arr[i, eids.index("random1")]
    # Tune's experiment state and the feature cache live on S3 too.
    assert any("experiment_state" in p for p in root.list("tune", recursive=True))
    assert len([p for p in root.list("features", recursive=True) if p.endswith(".npz")]) == 48

    again = run_job(args, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["planned"] == 0 and summary["trials_run"] == 0
    assert len(raw_rows(root)) == 24


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_interrupted_run_resumes_without_recomputing(zoo_files, ray_local, tmp_path, caplog, sig):
    """SIGINT lets Tune save its state; after SIGKILL the state may predate finished trials,
    which then find their rows in the matrix and skip. The resumed run counts the cells
    written before, and says nothing of trial folders it does not read (removed here)."""
    from jobs.fill_matrix import main

    root_uri = str(tmp_path / "root")
    register(root_uri, str(zoo_files / "tasks"), str(zoo_files / "weights"))
    matrix_dir = tmp_path / "root" / MATRIX_DIR
    summary_path = tmp_path / "summary.json"
    args = ["--root", root_uri, "--image-size", str(SIZE), "--num-samples", "2",
            "--cells-per-trial", "1", "--max-concurrent-trials", "1", "--no-progress",
            "--summary-json", str(summary_path)]
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "jobs.fill_matrix", *args, "--address", address],
                            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if matrix_dir.exists() and len(list(matrix_dir.glob("part-*.parquet"))) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), err[-3000:]
    before = {p.name: p.stat().st_mtime_ns for p in matrix_dir.glob("part-*.parquet")}
    assert 2 <= len(before) < 18
    for trial_dir in (tmp_path / "root" / "tune").glob("*/unit_*"):
        shutil.rmtree(trial_dir)

    caplog.set_level(logging.INFO, logger="t2v_core.matrix.experiment")
    tune_results = logging.getLogger("ray.tune.analysis.experiment_analysis")  # Ray: no propagation
    tune_results.addHandler(caplog.handler)
    try:
        assert main(args) == 0
    finally:
        tune_results.removeHandler(caplog.handler)
    assert f"{len(before)} of this experiment's 18 cells are written already" in caplog.text
    assert "Failed to fetch metrics" not in caplog.text
    summary = json.loads(summary_path.read_text())
    assert summary["resumed"] and summary["cells_ok"] == 18
    assert 1 <= summary["trials_run"] <= 18 - len(before)  # finished cells are not re-trained
    assert summary["trials_run"] + summary["trials_skipped"] <= 18
    after = {p.name: p.stat().st_mtime_ns for p in matrix_dir.glob("part-*.parquet")}
    assert {k: after[k] for k in before} == before
    keys = [(r["task_id"], r["expert_id"]) for r in raw_rows(StorageRoot(root_uri))]
    assert len(keys) == len(set(keys)) == 18


def test_budgeted_runs_and_feature_cache_reuse(zoo_files, ray_local, tmp_path):
    from jobs.fill_matrix import main

    root_uri = str(tmp_path / "root")
    register(root_uri, str(zoo_files / "tasks"), str(zoo_files / "weights"))
    summary_path = tmp_path / "summary.json"
    args = ["--root", root_uri, "--image-size", str(SIZE), "--layout", "trial",
            "--num-samples", "2", "--max-concurrent-trials", "1", "--tasks", "orient-a,colour-*",
            "--experts", "random0", "--no-progress", "--summary-json", str(summary_path)]
    assert main([*args, "--max-cells", "1"]) == 0
    s1 = json.loads(summary_path.read_text())
    assert (s1["requested"], s1["planned"], s1["cells_ok"], s1["trials_run"]) == (3, 1, 1, 2)
    # Two trials (configurations) of one cell: the first computes train and test features,
    # the second reads them from the cache.
    assert (s1["feature_misses"], s1["feature_hits"]) == (2, 2)
    parts = {p: os.stat(tmp_path / "root" / p).st_mtime_ns
             for p in StorageRoot(root_uri).list(MATRIX_DIR)}

    assert main(args) == 0
    s2 = json.loads(summary_path.read_text())
    assert (s2["already_done"], s2["planned"], s2["cells_ok"], s2["trials_run"]) == (1, 2, 3, 4)
    assert {p: os.stat(tmp_path / "root" / p).st_mtime_ns for p in parts} == parts
    rows = raw_rows(StorageRoot(root_uri))
    assert sorted(r["task_id"] for r in rows) == ["colour-a", "colour-b", "orient-a"]
    assert all(r["trials"] == 2 and json.loads(r["config"])["layout"] == "trial" for r in rows)


def test_pivot_rejects_duplicate_cells():
    table = pa.Table.from_pylist([_row("t", "e").record(), _row("t", "e").record()])
    with pytest.raises(ValueError, match="two rows"):
        pivot(table)


def test_finetune_mode_through_tune_matches_a_direct_call(zoo_files, ray_local, tmp_path):
    from jobs.fill_matrix import main
    from t2v_core.matrix.finetune import SearchSpace, finetune_cell

    root_uri = str(tmp_path / "root")
    tasks, experts = register(root_uri, str(zoo_files / "tasks"), str(zoo_files / "weights"))
    args = ["--root", root_uri, "--image-size", str(SIZE), "--mode", "finetune", "--epochs", "2",
            "--num-samples", "1", "--tasks", "spot-b", "--experts", "random1", "--no-progress"]
    assert main(args) == 0
    (row,) = raw_rows(StorageRoot(root_uri))
    cfg = json.loads(row["config"])
    assert (row["status"], row["mode"], row["epochs"], cfg["layout"]) == ("ok", "finetune", 2, "trial")

    task = next(t for t in tasks if t.task_id == "spot-b")
    expert = next(e for e in experts if e.expert_id == "random1")
    x, y = load_split(task, "train", SIZE, None, 0)
    xt, yt = load_split(task, "test", SIZE, None, 0)
    assert cfg["n_test"] == len(yt) == task.n_test
    problem = ImageProblem.with_validation(x, y, xt, yt, task.n_classes, 0.2, 0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the trial (one CPU per trial)
    try:
        direct = finetune_cell(build_probe("small_cnn", expert.weights_uri, input_size=SIZE).backbone,
                               problem, SearchSpace().sample(1)[0], FinetuneRecipe(epochs=2))
    finally:
        torch.set_num_threads(before)
    assert cfg["hp"] == SearchSpace().sample(1)[0].to_dict()
    assert (row["test_error"], row["train_error"]) == (direct.test_error, direct.train_error)
