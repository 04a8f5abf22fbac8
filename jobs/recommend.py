"""Recommend experts for tasks: ones already in the zoo, or new task data embedded on the fly.

    python -m jobs.recommend --root ./t2v-data --tasks glyphs-latin,digits-0to4
    python -m jobs.recommend --root ./t2v-data --data /path/to/new_task --probe resnet34 \
        --weights s3://bucket/resnet34.pth

Ranks the experts with the newest MODEL2VEC of the root (or ``--model models:/…@champion``
from the MLflow registry), prints the top ``--top-k`` per task and writes all ranks to
``recommendations/<run>/part-*.parquet`` (with the true error where the matrix has it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from jobs._cli import (
    EmbeddingSetOptions,
    add_common_args,
    add_embedding_args,
    parse_config,
    run_stamp,
    setup_logging,
)
from t2v_core.embedding.probes import build_probe
from t2v_core.embedding.store import EmbedConfig, embed_task, read_embeddings
from t2v_core.matrix.rows import read_matrix
from t2v_core.recommend.model_store import load_model
from t2v_core.review.recommender_model import recommendations_frame
from t2v_core.storage import StorageRoot
from t2v_core.zoo.manifest import read_tasks, select_specs

log = logging.getLogger("jobs.recommend")


class RecommendError(ValueError):
    """The tasks cannot be ranked: unknown, not embedded, or embedded by another probe."""


@dataclass(frozen=True, kw_only=True)
class Config(EmbeddingSetOptions):
    """The job's options, with those of :class:`EmbeddingSetOptions`; field names are the
    flags' dest names, defaults the flags'. Exactly one of ``tasks`` (ids or globs of zoo
    tasks) and ``data`` (folders of new tasks)."""

    tasks: str | None = None
    data: tuple[str, ...] | None = None
    probe: str | None = None
    weights: str | None = None
    image_size: int | None = None
    max_per_class: int | None = None
    version: str | None = None
    model: str | None = None
    top_k: int = 5

    def __post_init__(self) -> None:
        if (self.tasks is None) == (self.data is None):
            raise ValueError("give exactly one of --tasks (zoo tasks) and --data (new task data)")
        if self.data is not None and not self.probe:
            raise ValueError("--data needs --probe (and --weights) to embed the new tasks")


@dataclass(frozen=True, eq=False)
class RecommendResult:
    """Every expert ranked for every task (task_id, rank, expert_id, score, distance and, where
    the matrix has it, true_error), and where the ranks were written."""

    run_id: str
    frame: pd.DataFrame
    path: str  # URI of recommendations/<run_id>

    def top(self, k: int) -> pd.DataFrame:
        return self.frame[self.frame["rank"] <= k]


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m jobs.recommend", description=__doc__.split("\n\n")[0])
    add_common_args(p)
    add_embedding_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tasks", help="comma-separated ids or globs of zoo tasks (with stored "
                     "embeddings)")
    src.add_argument("--data", nargs="+", help="folder(s) of new task data (local or s3://), "
                     "laid out as <task>/{train,test}/<class>/<image> or train.parquet")
    p.add_argument("--probe", help="probe architecture, to embed --data (must be the model's probe)")
    p.add_argument("--weights", default=None, help="probe weights URI, to embed --data")
    p.add_argument("--image-size", type=int, default=None, help="probe input size for --data")
    p.add_argument("--max-per-class", type=int, default=None)
    p.add_argument("--version", default=None, help="MODEL2VEC version under the root (default LATEST)")
    p.add_argument("--model", default=None,
                   help="an MLflow model URI instead, e.g. models:/task2vec-recommender@champion")
    p.add_argument("--top-k", type=int, default=5, help="experts printed per task")
    return parse_config(p, Config, argv)


def _embed_new(config: Config, meta: dict) -> tuple[list[str], np.ndarray]:
    from t2v_core.zoo.data import scan_task

    probe = build_probe(config.probe, config.weights, input_size=config.image_size)
    if probe.probe_id != meta["probe_id"]:
        raise RecommendError(f"the recommender was trained on embeddings of probe "
                             f"{meta['probe_id']}, but --probe/--weights give {probe.probe_id}")
    embed_config = EmbedConfig(method=meta["method"], image_size=config.image_size,
                               max_per_class=config.max_per_class)
    ids, vectors = [], []
    for uri in config.data:
        spec, problems = scan_task(uri)
        for problem in problems:
            log.warning("%s: %s", spec.task_id, problem)
        ids.append(spec.task_id)
        vectors.append(embed_task(spec, probe, embed_config).vector)
        log.info("embedded new task %s (%d classes)", spec.task_id, spec.n_classes)
    return ids, np.stack(vectors)


def _zoo_embeddings(root: StorageRoot, patterns: str, meta: dict) -> tuple[list[str], np.ndarray]:
    try:
        tasks = select_specs(read_tasks(root), patterns)
    except ValueError as exc:
        raise RecommendError(str(exc)) from exc
    task_ids = [t.task_id for t in tasks]
    emb = read_embeddings(root, meta["probe_id"], meta["method"], tasks, with_filter_names=False)
    missing = [t for t in task_ids if t not in emb.task_ids]
    if missing:
        raise RecommendError(f"no current {meta['probe_id']}/{meta['method']} embedding for "
                             f"{', '.join(missing)}: run jobs.embed_tasks first")
    return task_ids, np.stack([emb.row(t) for t in task_ids])


def _registered_model(config: Config, root: StorageRoot):
    from t2v_core.recommend.meta_dataset import resolve_embedding_set
    from t2v_core.review.recommender_model import load_recommender

    if config.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(config.tracking_uri)
    model = load_recommender(config.model).unwrap_python_model().model
    probe_id, method = resolve_embedding_set(root, config.probe_id, config.method)
    return model, {"probe_id": probe_id, "method": method}


def recommend(config: Config) -> pd.DataFrame:
    """The ranks of every expert for the configured tasks (nothing is written)."""
    root = StorageRoot(config.root)
    if config.model:
        model, meta = _registered_model(config, root)
    else:
        model, meta = load_model(root, config.version)
    if config.data:
        task_ids, vectors = _embed_new(config, meta)
    else:
        task_ids, vectors = _zoo_embeddings(root, config.tasks, meta)
    matrix = read_matrix(root).to_pandas() if root.exists("matrix") else None
    return recommendations_frame(model, vectors, task_ids, errors=matrix)


def run(config: Config) -> RecommendResult:
    """Rank, write the ranks under ``recommendations/<run>/`` and, with tracking, log them."""
    frame = recommend(config)
    root = StorageRoot(config.root)
    run_id = run_stamp()
    root.write_part(f"recommendations/{run_id}", pa.Table.from_pandas(frame, preserve_index=False),
                    ["task_id", "rank"])
    result = RecommendResult(run_id, frame, root.join(f"recommendations/{run_id}"))
    log.info("wrote %d ranked rows to %s", len(frame), result.path)
    if config.tracking:
        from t2v_core.review import plots, tracking

        tracking.configure(root, tracking_uri=config.tracking_uri)
        with tracking.stage_run("recommend", {"tasks": ",".join(frame["task_id"].unique()),
                                              "top_k": config.top_k, "run": run_id}):
            tracking.log_table(frame, "recommendations")
            if "true_error" in frame and frame["true_error"].notna().any():
                tracking.log_figures({"topk": plots.topk_bars(frame, k=config.top_k)})
    return result


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    setup_logging(config.verbose)
    try:
        result = run(config)
    except (ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    print(result.top(config.top_k).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
