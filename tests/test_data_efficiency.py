"""Matrices at several training-set sizes side by side, and the data-efficiency job that fills,
embeds and evaluates them (real Ray, real Parquet, the tiny learnable zoo of test_matrix)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from test_matrix import REPO, SIZE, _env, register, zoo_files  # noqa: F401  (fixture)

from jobs import data_efficiency
from t2v_core.embedding.probes import build_probe
from t2v_core.embedding.store import EmbedConfig, embed_task, read_embeddings
from t2v_core.matrix.experts import SourceHead, head_uri
from t2v_core.matrix.rows import (
    ANY_SIZE,
    MATRIX_DIR,
    MatrixRow,
    compact,
    done_cells,
    part_for,
    pivot,
    read_matrix,
    rows_table,
    sizes,
    write_rows,
    written,
)
from t2v_core.recommend.efficiency import shared_contexts
from t2v_core.recommend.meta_dataset import load_meta_dataset, resolve_embedding_set
from t2v_core.recommend.protocol import evaluate_selectors
from t2v_core.recommend.selectors import (
    LEEPSelector,
    LogMESelector,
    NCESelector,
    RidgeLOOSelector,
)
from t2v_core.recommend.table1 import transfer_context
from t2v_core.storage import StorageRoot
from t2v_core.zoo.manifest import ExpertSpec, TaskSpec, read_tasks

PROBE_ID = "small_cnn-random0"
SCORES = {"LogME": LogMESelector, "LEEP": LEEPSelector, "Ridge LOO": RidgeLOOSelector,
          "NCE": NCESelector}
OLD_KEYS = ["task_id", "expert_id", "mode"]  # a matrix cell's key before the size joined it


def _row(task: str, expert: str, err: float, cap: int | None = None, config: dict | None = None
         ) -> MatrixRow:
    return MatrixRow(task, expert, "probe", "ok", err, err, 10, 5, 1, 0.5, "t", "e",
                     config or {"data": {"max_per_class": cap}}, None, max_per_class=cap)


def _spec(tid: str) -> TaskSpec:
    return TaskSpec(tid, "f", "/x", "imagefolder", ("a", "b"), 4, 2, "t")


def _expert(eid: str) -> ExpertSpec:
    return ExpertSpec(eid, "small_cnn", "/w", None, "e")


# -- the size as part of a cell's key (no Ray) ---------------------------------------------
def test_sizes_are_separate_cells(tmp_path):
    root = StorageRoot(tmp_path)
    full = write_rows(root, [_row("t1", "e1", 0.1), _row("t2", "e1", 0.2)])
    capped = write_rows(root, [_row("t1", "e1", 0.4, 5), _row("t2", "e1", 0.6, 5)])
    assert full != capped
    assert write_rows(root, [_row("t1", "e1", 0.4, 5), _row("t2", "e1", 0.6, 5)]) == capped
    tasks, experts = [_spec("t1"), _spec("t2")], [_expert("e1")]

    assert [r["test_error"] for r in read_matrix(root).to_pylist()] == [0.1, 0.2]
    assert [r["test_error"] for r in read_matrix(root, max_per_class=5).to_pylist()] == [0.4, 0.6]
    assert read_matrix(root, max_per_class=10).num_rows == 0
    every = read_matrix(root, max_per_class=ANY_SIZE)
    assert every.num_rows == 4 and sizes(root) == [5, None]
    # pivot picks one size (full data by default) out of a table holding several
    np.testing.assert_allclose(pivot(every)[0], [[0.1], [0.2]])
    np.testing.assert_allclose(pivot(every, max_per_class=5)[0], [[0.4], [0.6]])

    assert done_cells(root, tasks, experts, "probe") == {("t1", "e1"), ("t2", "e1")}
    assert done_cells(root, tasks, experts, "probe", max_per_class=10) == set()
    assert written(root, tasks, experts[0], "probe")
    assert written(root, tasks, experts[0], "probe", 5)
    assert not written(root, tasks, experts[0], "probe", 10)
    assert part_for([("t1", "e1", "probe"), ("t2", "e1", "probe")], 5) == capped

    write_rows(root, [_row("t1", "e1", 0.3, 5)])  # a later part for one capped cell
    assert len(compact(root)) == 2 and len(root.list(MATRIX_DIR)) == 2  # one part per size
    assert read_matrix(root, max_per_class=ANY_SIZE).num_rows == 4


def test_rows_without_the_column_read_as_full_data(tmp_path):
    """Parts written before the size joined the key: full data, unless their recipe says
    otherwise; rewriting such cells replaces their part instead of adding one."""
    root = StorageRoot(tmp_path)
    old = rows_table([_row("t1", "e1", 0.1), _row("t2", "e1", 0.2)])
    legacy = root.write_part(MATRIX_DIR, old.drop_columns(["max_per_class"]), OLD_KEYS)
    capped = rows_table([_row("t3", "e1", 0.7, config={"data": {"max_per_class": 5}})])
    root.write_part(MATRIX_DIR, capped.drop_columns(["max_per_class"]), OLD_KEYS)

    rows = read_matrix(root).to_pylist()
    assert [(r["task_id"], r["max_per_class"]) for r in rows] == [("t1", None), ("t2", None)]
    assert [r["task_id"] for r in read_matrix(root, max_per_class=5).to_pylist()] == ["t3"]
    assert write_rows(root, [_row("t1", "e1", 0.1), _row("t2", "e1", 0.2)]) == legacy
    assert read_matrix(root, max_per_class=ANY_SIZE, dedup=False).num_rows == 3


# -- through Ray Tune ----------------------------------------------------------------------
def _fill(root_uri: str, **options) -> dict:
    from jobs.fill_matrix import Config, run

    return dataclasses.asdict(run(Config(
        root=root_uri, image_size=SIZE, num_samples=1, tasks="orient-a,colour-b,spot-a",
        experts="random0,orient-a-expert", no_progress=True, tracking=False, **options)))


def _mtimes(root: StorageRoot, rel: str) -> dict[str, int]:
    return {p: os.stat(root.join(p)).st_mtime_ns for p in root.list(rel, recursive=True)}


def test_matrices_at_two_sizes_coexist_and_fill_once(zoo_files, ray_local, tmp_path):  # noqa: F811
    root_uri = str(tmp_path / "root")
    register(root_uri, str(zoo_files / "tasks"), str(zoo_files / "weights"))
    root = StorageRoot(root_uri)
    first = [_fill(root_uri, max_per_class=3), _fill(root_uri)]
    assert [(s["planned"], s["cells_ok"]) for s in first] == [(6, 6), (6, 6)]
    rows = read_matrix(root, max_per_class=ANY_SIZE).to_pylist()
    assert sorted({r["max_per_class"] for r in rows}, key=str) == [3, None]
    by_size = {cap: {(r["task_id"], r["expert_id"]): r for r in rows if r["max_per_class"] == cap}
               for cap in (3, None)}
    assert len(by_size[3]) == len(by_size[None]) == 6
    for key, small in by_size[3].items():
        # 3 images per class of 12: fewer to train on; the recipe says the same cap
        assert small["n_train"] < by_size[None][key]["n_train"]
        assert json.loads(small["config"])["data"]["max_per_class"] == 3

    # the feature cache keys on the cap: the capped training features are files of their own,
    # while the uncapped test split's are shared by both sizes
    cached = [p.rsplit("/", 1)[-1] for p in root.list("features", recursive=True)]
    assert sum("-train-s16-m3-" in f for f in cached) == 6
    assert sum("-train-s16-mall-" in f for f in cached) == 6
    assert sum("-test-" in f for f in cached) == 6

    parts = _mtimes(root, MATRIX_DIR)
    again = [_fill(root_uri, max_per_class=3), _fill(root_uri)]
    assert [(s["planned"], s["trials_run"], s["cells_ok"]) for s in again] == [(0, 0, 6)] * 2
    assert _mtimes(root, MATRIX_DIR) == parts


# -- the job -------------------------------------------------------------------------------
def _job_args(root_uri: str) -> list[str]:
    return ["--root", root_uri, "--sizes", "all,4", "--probe", "small_cnn",
            "--image-size", str(SIZE), "--num-samples", "1", "--folds", "3",
            "--model2vec-epochs", "20", "--no-tracking", "--no-progress"]


def _report(root: StorageRoot) -> tuple[str, dict]:
    runs = sorted(p for p in root.list("evaluation", recursive=True)
                  if p.endswith("data_efficiency.json"))
    base = runs[-1].rsplit("/", 1)[0]
    return (root.read_bytes(f"{base}/data_efficiency.md").decode(),
            json.loads(root.read_bytes(f"{base}/data_efficiency.json")))


def _relative(errors: np.ndarray, ranking: list[int], floor: float) -> float:
    best = np.nanmin(errors)
    pick = next(errors[j] for j in ranking if np.isfinite(errors[j]))
    return 100 * (pick - best) / max(best, floor)


def _weights_with_heads(files: Path, tmp_path: Path) -> str:
    """The zoo's expert weights, each with a seeded random source head beside it, so that
    LEEP and NCE have inputs too."""
    weights = tmp_path / "weights"
    shutil.copytree(files / "weights", weights)
    dim = build_probe("small_cnn", None, input_size=SIZE).feature_dim
    for i, path in enumerate(sorted(weights.glob("*.pt"))):
        g = torch.Generator().manual_seed(i)
        head = SourceHead(torch.randn(5, dim, generator=g), torch.randn(5, generator=g))
        with open(head_uri(str(path)), "wb") as f:
            f.write(head.to_bytes())
    return str(weights)


def _check_context_columns(root: StorageRoot, report: dict) -> None:
    """The per-expert scores at every size, each ranked from that size's own cached features, as
    the selectors rank them given those alone; no brute-force column, since 4 images per class
    leave no validation split."""
    assert report["context_columns"] == list(SCORES)
    direct = {}
    for label, cap in (("4/class", 4), ("all", None)):
        reports = report["by_size"][label]["reports"]
        assert list(reports)[-len(SCORES) - 1:] == [*SCORES, "Oracle"]
        data = load_meta_dataset(root, max_per_class=cap).subset(report["task_ids"])
        assert np.isfinite(data.val_errors).all() == (cap is None)
        context = transfer_context(root, data, SIZE, cap)
        per_class = {len(y) / len(np.unique(y)) for y in context["labels"]}
        assert per_class == {4 if cap else 12}
        alone = evaluate_selectors({n: cls() for n, cls in SCORES.items()}, data.embeddings,
                                   data.errors, data.expert_sources, list(data.expert_ids),
                                   list(data.families), folds=3, context=context)
        direct[label] = {n: alone.reports[n].rankings for n in SCORES}
        assert {n: reports[n]["rankings"] for n in SCORES} == direct[label]
    # the sizes' features rank differently, so the check above tells one size from the other
    assert direct["4/class"] != direct["all"]


def test_job_fills_embeds_and_evaluates_each_size(zoo_files, ray_local, tmp_path,  # noqa: F811
                                                  caplog):
    from jobs import embed_tasks

    root_uri = str(tmp_path / "root")
    register(root_uri, str(zoo_files / "tasks"), _weights_with_heads(zoo_files, tmp_path))
    root = StorageRoot(root_uri)
    assert embed_tasks.main(["--root", root_uri, "--probe", "small_cnn", "--image-size",
                             str(SIZE), "--no-progress"]) == 0

    caplog.set_level(logging.WARNING, logger="t2v_core.recommend.efficiency")
    assert data_efficiency.main(_job_args(root_uri)) == 0
    assert ("Brute force (val) left out at every size: its input 'val_errors' is missing at "
            "4/class") in caplog.text
    markdown, report = _report(root)
    assert report["sizes"] == ["4/class", "all"] and report["task_embeddings"] == "subsample"
    assert "| selector | 4/class | all |" in markdown and "Top-1 hit rate" in markdown
    assert all(f"| {name} |" in markdown for name in SCORES)
    _check_context_columns(root, report)
    tasks = report["task_ids"]
    assert len(tasks) == 6
    for label, cap in (("4/class", 4), ("all", None)):
        reports = report["by_size"][label]["reports"]
        assert reports["Oracle"]["by_meta_task"]["Mixed"]["relative_increase_pct"] == 0.0
        # every per-task number of a size comes from that size's matrix rows
        errors, _, experts = pivot(read_matrix(root, max_per_class=cap), tasks,
                                   report["expert_ids"], max_per_class=cap)
        assert report["mean_oracle_error"][label] == pytest.approx(
            np.nanmin(errors, axis=1).mean())
        prior = reports["Mean-error prior"]
        got = [_relative(errors[t], prior["rankings"][t], report["error_floor"])
               for t in range(len(tasks))]
        np.testing.assert_allclose(prior["relative_increase_pct"], got)
    small = pivot(read_matrix(root, max_per_class=4), tasks, report["expert_ids"],
                  max_per_class=4)[0]
    full = pivot(read_matrix(root), tasks, report["expert_ids"])[0]
    assert not np.allclose(small, full)

    # the subsets' embeddings sit beside the full-data ones, keyed by the size: one set, two
    # sizes, each a vector of the library's on the same seeded subset
    assert resolve_embedding_set(root) == (PROBE_ID, "montecarlo")
    assert not root.exists("subsampled")
    sub = read_embeddings(root, PROBE_ID, "montecarlo", max_per_class=4)
    main = read_embeddings(root, PROBE_ID, "montecarlo")
    assert sub.task_ids == main.task_ids and not np.allclose(sub.vectors, main.vectors)
    spec = read_tasks(root)[0]
    probe = build_probe("small_cnn", None, input_size=SIZE)
    on_four = embed_task(spec, probe, EmbedConfig(image_size=SIZE, max_per_class=4))
    np.testing.assert_allclose(sub.row(spec.task_id), on_four.vector, rtol=1e-4, atol=1e-10)
    data = load_meta_dataset(root, max_per_class=4, task_embeddings="subsample")
    np.testing.assert_allclose(data.embeddings, sub.vectors[[sub.task_ids.index(t)
                                                             for t in data.task_ids]])

    # a re-run computes nothing: no matrix part and no embedding part is rewritten
    before = {**_mtimes(root, MATRIX_DIR), **_mtimes(root, "embeddings")}
    db = f"sqlite:///{tmp_path}/mlflow.db"
    tracked = [a for a in _job_args(root_uri) if a != "--no-tracking"]
    assert data_efficiency.main([*tracked, "--tracking-uri", db]) == 0
    assert {**_mtimes(root, MATRIX_DIR), **_mtimes(root, "embeddings")} == before
    assert _report(root)[1]["work"]["4/class"] == {
        "matrix": {"planned": 0, "already_done": 18, "cells_ok": 18, "cells_failed": 0,
                   "cells_missing": 0, "trials_errored": 0},
        "embeddings": {"done": 0, "up_to_date": 6, "failed": 0}}
    client = MlflowClient(db)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string="tags.`t2v.stage` = 'data_efficiency'")
    metrics = run.data.metrics
    assert metrics["data_efficiency/4_per_class/Oracle/relative_increase_pct"] == 0.0
    assert metrics["cells_filled"] == 0 and metrics["tasks_embedded"] == 0
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "data_efficiency.md", "data_efficiency.json"}


def test_a_column_some_size_cannot_score_is_left_out_at_every_size(caplog):
    contexts = {4: {"features": [1], "labels": [2], "val_errors": [3]},
                None: {"features": [4], "labels": [5], "source_probs": [6], "source_labels": [7],
                       "val_errors": [8]}}
    caplog.set_level(logging.WARNING, logger="t2v_core.recommend.efficiency")
    assert shared_contexts(contexts) == {
        4: {"features": [1], "labels": [2], "val_errors": [3]},
        None: {"features": [4], "labels": [5], "val_errors": [8]}}
    assert "LEEP left out at every size: its input 'source_probs' is missing at 4/class" \
        in caplog.text
    assert "NCE left out at every size: its input 'source_labels' is missing at 4/class" \
        in caplog.text
    assert "LogME" not in caplog.text and "Brute force" not in caplog.text


def test_job_refuses_a_probe_other_than_the_embeddings_one(zoo_files, ray_local, tmp_path):  # noqa: F811
    from jobs import embed_tasks

    root_uri = str(tmp_path / "root")
    register(root_uri, str(zoo_files / "tasks"), str(zoo_files / "weights"))
    assert embed_tasks.main(["--root", root_uri, "--probe", "small_cnn", "--image-size",
                             str(SIZE), "--no-progress", "--tasks", "orient-a,spot-b"]) == 0
    args = _job_args(root_uri)
    assert data_efficiency.main([*args, "--seed", "1"]) == 1  # small_cnn-random1
    assert not StorageRoot(root_uri).exists(MATRIX_DIR)


def test_help_and_bad_sizes():
    out = subprocess.run([sys.executable, "-m", "jobs.data_efficiency", "--help"], cwd=REPO,
                         env=_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--sizes", "--embeddings", "--probe", "--folds", "--repeats", "--root"):
        assert flag in out.stdout
    assert data_efficiency.parse_sizes("all,10,5,10") == (5, 10, None)
    for bad in ("0,all", "ten", ""):
        with pytest.raises(SystemExit):
            data_efficiency.parse_args(["--sizes", bad, "--embeddings", "full"])
    with pytest.raises(SystemExit):  # subsets need a probe to embed them
        data_efficiency.parse_args(["--sizes", "5,all"])
    with pytest.raises(SystemExit):  # leave-one-task-out has no split to repeat
        data_efficiency.parse_args(["--embeddings", "full", "--repeats", "2"])
    assert data_efficiency.parse_args(["--embeddings", "full", "--folds", "3",
                                       "--repeats", "2"]).repeats == 2


def test_the_demo_runs_the_job_after_evaluate():
    from jobs import demo

    names = list(demo.STAGE_NAMES)
    assert names.index("data_efficiency") == names.index("evaluate") + 1
    for small in (True, False):
        cfg = demo.Config(root="/tmp/unused", small=small)
        config = demo.stage_configs(cfg)["data_efficiency"]
        assert isinstance(config, data_efficiency.Config) and config.embeds_subsets
        assert (config.probe, config.image_size) == (demo.PROBE_ARCH, cfg.world.image_size)
        caps = config.sizes
        assert caps[-1] is None and all(0 < c < cfg.world.n_train for c in caps[:-1])
