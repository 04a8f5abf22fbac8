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

import numpy as np
import pandas as pd
import pyarrow as pa

from jobs._cli import add_common_args, add_embedding_args, run_stamp, setup_logging
from jobs.train_model2vec import load_model
from t2v_core.embedding.probes import build_probe
from t2v_core.embedding.store import EmbedConfig, embed_task, read_embeddings
from t2v_core.matrix.rows import read_matrix
from t2v_core.review.recommender_model import recommendations_frame
from t2v_core.storage import StorageRoot
from t2v_core.zoo.manifest import read_tasks

log = logging.getLogger("jobs.recommend")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.recommend", description=__doc__.split("\n\n")[0])
    add_common_args(p)
    add_embedding_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tasks", help="comma-separated ids of zoo tasks (with stored embeddings)")
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
    return p.parse_args(argv)


def _embed_new(args, meta: dict) -> tuple[list[str], np.ndarray]:
    from t2v_core.zoo.data import scan_task

    if not args.probe:
        raise SystemExit("--data needs --probe (and --weights) to embed the new tasks")
    probe = build_probe(args.probe, args.weights, input_size=args.image_size)
    if probe.probe_id != meta["probe_id"]:
        raise SystemExit(f"the recommender was trained on embeddings of probe {meta['probe_id']}, "
                         f"but --probe/--weights give {probe.probe_id}")
    config = EmbedConfig(method=meta["method"], image_size=args.image_size,
                         max_per_class=args.max_per_class)
    ids, vectors = [], []
    for uri in args.data:
        spec, problems = scan_task(uri)
        for problem in problems:
            log.warning("%s: %s", spec.task_id, problem)
        ids.append(spec.task_id)
        vectors.append(embed_task(spec, probe, config).vector)
        log.info("embedded new task %s (%d classes)", spec.task_id, spec.n_classes)
    return ids, np.stack(vectors)


def _zoo_embeddings(root: StorageRoot, task_ids: list[str], meta: dict) -> np.ndarray:
    tasks = {t.task_id: t for t in read_tasks(root)}
    unknown = [t for t in task_ids if t not in tasks]
    if unknown:
        raise SystemExit(f"not in the zoo: {', '.join(unknown)}")
    emb = read_embeddings(root, meta["probe_id"], meta["method"], [tasks[t] for t in task_ids],
                          with_filter_names=False)
    missing = [t for t in task_ids if t not in emb.task_ids]
    if missing:
        raise SystemExit(f"no current {meta['probe_id']}/{meta['method']} embedding for "
                         f"{', '.join(missing)}: run jobs.embed_tasks first")
    return np.stack([emb.row(t) for t in task_ids])


def recommend(args) -> pd.DataFrame:
    root = StorageRoot(args.root)
    if args.model:
        from t2v_core.review.recommender_model import load_recommender

        if args.tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(args.tracking_uri)
        pyfunc = load_recommender(args.model)
        model = pyfunc.unwrap_python_model().model
        from t2v_core.recommend.meta_dataset import resolve_embedding_set

        probe_id, method = resolve_embedding_set(root, args.probe_id, args.method)
        meta = {"probe_id": probe_id, "method": method}
    else:
        model, meta = load_model(root, args.version)
    if args.data:
        task_ids, vectors = _embed_new(args, meta)
    else:
        task_ids = [t.strip() for t in args.tasks.split(",") if t.strip()]
        vectors = _zoo_embeddings(root, task_ids, meta)
    matrix = read_matrix(root).to_pandas() if root.exists("matrix") else None
    return recommendations_frame(model, vectors, task_ids, errors=matrix)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    frame = recommend(args)
    root = StorageRoot(args.root)
    run_id = run_stamp()
    root.write_part(f"recommendations/{run_id}", pa.Table.from_pandas(frame, preserve_index=False),
                    ["task_id", "rank"])
    top = frame[frame["rank"] <= args.top_k]
    print(top.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    log.info("wrote %d ranked rows to %s", len(frame), root.join(f"recommendations/{run_id}"))
    if args.tracking:
        from t2v_core.review import plots, tracking

        tracking.configure(root, tracking_uri=args.tracking_uri)
        with tracking.stage_run("recommend", {"tasks": ",".join(frame["task_id"].unique()),
                                              "top_k": args.top_k, "run": run_id}):
            tracking.log_table(frame, "recommendations")
            if "true_error" in frame and frame["true_error"].notna().any():
                tracking.log_figures({"topk": plots.topk_bars(frame, k=args.top_k)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
