"""The performance matrix: cells filled through Ray Tune into Parquet (local and moto S3),
skipped when present, resumed after an interruption, failed with a reason when training
diverges, and the feature cache reused across trials."""

from __future__ import annotations

import json
import os
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
from t2v_core.matrix.finetune import FinetuneRecipe, HeadConfig, ImageProblem, fit_network
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
from t2v_core.zoo.data import load_split, scan_task
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
def test_interrupted_run_resumes_without_recomputing(zoo_files, ray_local, tmp_path, sig):
    """SIGINT lets Tune save its state; after SIGKILL the state may predate finished trials,
    which then find their rows in the matrix and skip."""
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

    assert main(args) == 0
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
