"""Recommend experts for tasks: ones already in the zoo, or new task data embedded on the fly.

    python -m jobs.recommend --root ./t2v-data --tasks glyphs-latin,digits-0to4
    python -m jobs.recommend --root ./t2v-data --data /path/to/new_task --probe resnet34 \
        --weights s3://bucket/resnet34.pth

Ranks the experts with the newest MODEL2VEC of the root (or ``--model models:/…@champion``
from the MLflow registry), prints the top ``--top-k`` per task and writes all ranks to
``recommendations/<run>/part-*.parquet`` (with the true error where the matrix has it).

New task folders (``--data``) get the default recommender: every expert screens 3 training
images per class (its LogME and LEEP there), MODEL2VEC and the screen shortlist
``--shortlist-k`` experts, only those run over all of the task's training images, and their
ridge LOO and LEEP re-rank the shortlist; the table shows MODEL2VEC's score and rank, the
screen, the LogME, LEEP and ridge LOO of every shortlisted expert, and the final rank
(``--shortlist-k 0``: MODEL2VEC alone). The registered pyfunc model ranks from embeddings
alone, as the re-ranking needs the images.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from jobs._cli import EmbeddingSetOptions, opt, parse_config, run_main, run_stamp
from t2v_core.embedding.probes import default_input_size
from t2v_core.matrix.rows import read_matrix
from t2v_core.recommend.model_store import load_model
from t2v_core.recommend.shortlist_table import new_task_recommendations
from t2v_core.recommend.task_vectors import new_task_vectors, zoo_task_vectors
from t2v_core.review.recommender_model import recommendations_frame
from t2v_core.storage import StorageRoot

log = logging.getLogger("jobs.recommend")


@dataclass(frozen=True, kw_only=True)
class Config(EmbeddingSetOptions):
    """The job's options, one field per flag, with those of :class:`EmbeddingSetOptions`.
    Exactly one of ``tasks`` (ids or globs of zoo tasks) and ``data`` (folders of new tasks)."""

    tasks: str | None = opt(None, exclusive=True, help="comma-separated ids or globs of zoo "
                            "tasks (with stored embeddings)")
    data: tuple[str, ...] | None = opt(None, exclusive=True, nargs="+", help="folder(s) of new "
                                       "task data (local or s3://), laid out as "
                                       "<task>/{train,test}/<class>/<image> or train.parquet")
    probe: str | None = opt(None, help="probe architecture, to embed --data (must be the "
                            "model's probe)")
    weights: str | None = opt(None, help="probe weights URI, to embed --data")
    image_size: int | None = opt(None, help="probe input size for --data")
    max_per_class: int | None = opt(None)
    version: str | None = opt(None, help="MODEL2VEC version under the root (default LATEST)")
    model: str | None = opt(None, help="an MLflow model URI instead, e.g. "
                            "models:/task2vec-recommender@champion")
    top_k: int = opt(5, help="experts printed per task")
    shortlist_k: int = opt(3, help="experts MODEL2VEC shortlists for --data tasks, each run "
                           "over the task's images to re-rank them (0: MODEL2VEC alone)")

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
    return parse_config(Config, argv)


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
        task_ids, vectors = new_task_vectors(
            config.data, config.probe, config.weights, meta["probe_id"], meta["method"],
            image_size=config.image_size, max_per_class=config.max_per_class)
        if config.shortlist_k > 0:
            return new_task_recommendations(
                model, config.data, vectors, root,
                config.image_size or default_input_size(config.probe), k=config.shortlist_k,
                max_per_class=config.max_per_class)
    else:
        task_ids, vectors = zoo_task_vectors(root, config.tasks, meta["probe_id"], meta["method"])
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
            tracking.publish_to_pipeline(recommendations=frame)  # where a reviewer lands
    return result


def _print_top(config: Config, result: RecommendResult) -> None:
    print(result.top(config.top_k).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def main(argv: list[str] | None = None) -> int:
    return run_main(parse_args, run, argv, errors={ValueError: 1, FileNotFoundError: 1},
                    report=_print_top)


if __name__ == "__main__":
    sys.exit(main())
